"""Atomic file and folder writes: a reader never sees a half-written result."""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile


@contextlib.contextmanager
def atomic_dir(target):
  """Yields a temp folder beside `target`; on success it replaces `target` in one rename."""
  target = pathlib.Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{target.name}.tmp-', dir=target.parent))
  try:
    yield tmp
    if target.exists():
      old = target.with_name(f'.{target.name}.old-{os.getpid()}')
      os.replace(target, old)
      os.replace(tmp, target)
      shutil.rmtree(old)
    else:
      os.replace(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def atomic_write_text(path, text: str):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.tmp-', dir=path.parent)
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
