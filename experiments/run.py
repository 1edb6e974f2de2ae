"""Runs one experiment, a study (a config with `pairs`: experiments.study), runs side by side
(a config with `runs`: experiments.compare) or a chain of stages (a config with `stages`:
peftjax.train.stages), from a config.

  python -m experiments.run --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...] [--resume] [--traceback]

`--init_adapter=DIR` starts the run's adapter from a saved one (`method.init`): a peftjax
adapter of the config's method, or an HF PEFT LoRA adapter (docs/hf_peft.md), which trains on
as the `lora` it imports as, with its classifier as the head where it has one.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'folder for checkpoints, adapter, metrics')
_RESUME = flags.DEFINE_bool('resume', False, 'continue from the newest checkpoint in --workdir')
_INIT_ADAPTER = flags.DEFINE_string('init_adapter', None, 'start the adapter from this folder '
                                    '(peftjax or HF PEFT LoRA): sets method.init')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = cli.loaded(_CONFIG.value)
  if _INIT_ADAPTER.value:
    with config.unlocked():
      config.method.init = _INIT_ADAPTER.value
  if 'pairs' in config:
    from experiments.study import run_study  # pylint: disable=g-import-not-at-top
    cli.run_cleanly(lambda: run_study(config, _WORKDIR.value))  # resumes by itself
    return
  if 'runs' in config:
    from experiments.compare import run_compare  # pylint: disable=g-import-not-at-top
    cli.run_cleanly(lambda: run_compare(config, _WORKDIR.value))  # resumes by itself
    return
  if 'stages' in config:
    from peftjax.train.stages import run_stages  # pylint: disable=g-import-not-at-top
    cli.run_cleanly(lambda: run_stages(config, _WORKDIR.value))  # resumes by itself
    return
  from peftjax.train.loop import train  # pylint: disable=g-import-not-at-top
  cli.run_cleanly(lambda: train(config, _WORKDIR.value, resume=_RESUME.value))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse)
