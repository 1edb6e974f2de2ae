"""Atomic file and folder writes: a reader never sees a half-written result."""
from __future__ import annotations

import contextlib
import json
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
    for f in tmp.rglob('*'):
      f.chmod(_mode(0o777 if f.is_dir() else 0o666))
    tmp.chmod(_mode(0o777))  # Temp files are private; the result gets the usual modes.
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
  """`atomic_write_bytes` of `text` in UTF-8."""
  atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path, data: bytes):
  """Writes `data` to `path` through a temp file beside it and one rename."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.tmp-', dir=path.parent)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, _mode(0o666))
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def read_json(path, error: type[Exception], missing: str):
  """The JSON at `path`; raises `error(missing)` where there is no file and `error` naming the
  file where it is not valid JSON."""
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise error(missing) from None
  except json.JSONDecodeError as e:
    raise error(f'{path} is not valid JSON ({e})') from None


def _read_umask() -> int:
  umask = os.umask(0o022)  # Read once, at import (before any writer threads start).
  os.umask(umask)
  return umask


_UMASK = _read_umask()


def _mode(base: int) -> int:
  """`base` under the process umask: the mode `open`/`mkdir` would have given."""
  return base & ~_UMASK
