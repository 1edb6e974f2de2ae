"""Runs one experiment, or a study (a config with `pairs`: experiments.study), from a config.

  python -m experiments.run --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...] [--resume]
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'folder for checkpoints, adapter, metrics')
_RESUME = flags.DEFINE_bool('resume', False, 'continue from the newest checkpoint in --workdir')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  try:
    config.keys()  # A config file that failed to load raises here.
  except OSError as e:
    sys.exit(f'error: cannot load {flags.FLAGS["config"].config_filename}: '
             f'{str(e).splitlines()[-1].strip()}')
  if 'pairs' in config:
    from experiments.study import run_study
    run_study(config, _WORKDIR.value)  # resumes by itself
    return
  from peftjax.train.loop import train
  train(config, _WORKDIR.value, resume=_RESUME.value)


def _parse(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}')
  except (KeyError, AttributeError, ValueError, TypeError) as e:  # config_flags override errors
    message = str(e).encode().decode('unicode_escape').replace("'", '')
    sys.exit(f'error: unknown or invalid config key: {" ".join(message.split())}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse)
