"""What the command-line entry points share: one-line errors for a user's mistakes.

A mistake in the command, the config or the data (an unknown key, a target that matches
nothing, a missing asset, an existing workdir, a malformed data row) ends the command with one
line saying what was expected; `--traceback` shows the whole traceback instead.
"""
from __future__ import annotations

import json
import pathlib
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

_TRACEBACK = flags.DEFINE_bool('traceback', False, 'on an error, show the whole traceback')


def user_errors() -> tuple[type[Exception], ...]:
  """The exceptions that report a user's mistake (their message says what to change)."""
  from peftjax.data.assets import AssetError  # pylint: disable=g-import-not-at-top
  from peftjax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  return ValueError, OSError, FloatingPointError, AssetError, CheckpointError


def run_cleanly(fn):
  """Calls `fn()`; a user's mistake exits with one line (unless --traceback)."""
  try:
    return fn()
  except user_errors() as e:
    if _TRACEBACK.value:
      raise
    sys.exit(f'error: {" ".join(str(e).split())}  (--traceback shows where)')


def loaded(config, flag: str = 'config'):
  """`config`, or one line naming the config file that failed to load."""
  try:
    config.keys()  # A config file that failed to load raises here.
  except OSError as e:
    sys.exit(f'error: cannot load {flags.FLAGS[flag].config_filename}: '
             f'{str(e).splitlines()[-1].strip()}')
  return config


def parse(argv):
  """absl's flag parsing, with config and flag mistakes as one-line errors."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a config file's own error arrives with its traceback: last line
    sys.exit(f'error: {str(e).strip().splitlines()[-1]}')
  except (KeyError, AttributeError, ValueError, TypeError) as e:  # config_flags override errors
    message = str(e).encode().decode('unicode_escape').replace("'", '')
    sys.exit(f'error: unknown or invalid config key: {" ".join(message.split())}')


def _flag(argv, name: str) -> str | None:
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  return values[-1] if values else None


def define_run_or_config(argv) -> str | None:
  """Defines `--config` as a finished run's `config.json` (`--workdir=DIR` in `argv`, read
  before the flags are parsed so that `--config.KEY=VALUE` can change it) or as a config file
  (`--config=FILE`, a model as it is); returns the workdir, or None."""
  workdir = _flag(argv, 'workdir')
  if workdir:
    path = pathlib.Path(workdir) / 'config.json'
    if not path.exists():
      sys.exit(f'error: {path} does not exist: --workdir must be a run made by experiments.run')
    saved = ml_collections.ConfigDict(json.loads(path.read_text()))
    config_flags.DEFINE_config_dict('config', saved, lock_config=True)
  elif _flag(argv, 'config'):
    config_flags.DEFINE_config_file('config', None, 'a config file', lock_config=True)
  else:
    sys.exit('error: give --workdir=DIR (a finished run) or --config=FILE (a model as it is)')
  return workdir
