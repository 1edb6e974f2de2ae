"""Pretrains the project's ViT and caches it as a model that configs name.

  python -m experiments.pretrain_vit [--config=configs/vit_fashion_mnist.py] [--workdir=runs/vit_fashion_mnist] [--force]

Trains the config (full training from random init) in `--workdir`, resuming a run that is
there, then writes the best epoch's params, task head and the run's summary to
`<asset cache>/vit/<data.name>/` (`peftjax.models.vit`), which
`models.build({'name': 'vit', 'checkpoint': <data.name>})` loads. Does nothing when that
checkpoint exists already, unless `--force`.
"""
from __future__ import annotations

import json
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli

_DEFAULT_CONFIG = str(pathlib.Path(__file__).parents[1] / 'configs' / 'vit_fashion_mnist.py')


def _define_flags():
  """The command's flags (defined only when it runs, so that tests can import `pretrain`)."""
  config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'the pretraining config',
                                  lock_config=True)
  flags.DEFINE_string('workdir', 'runs/vit_fashion_mnist', 'folder of the training run')
  flags.DEFINE_bool('force', False, 'write the checkpoint even if it exists')


def pretrain(config, workdir, *, force: bool = False, cache=None) -> pathlib.Path:
  """Trains `config` in `workdir` (resuming) and caches the result; returns its folder.

  A no-op returning the folder when the checkpoint `config.data.name` exists (unless `force`).
  """
  from peftjax import models  # pylint: disable=g-import-not-at-top
  from peftjax.core.adapter import merge  # pylint: disable=g-import-not-at-top
  from peftjax.io.adapter_file import load_adapter  # pylint: disable=g-import-not-at-top
  from peftjax.models import vit  # pylint: disable=g-import-not-at-top
  from peftjax.train.loop import train  # pylint: disable=g-import-not-at-top
  if config.model.name != 'vit' or config.model.get('checkpoint'):
    raise ValueError('pretraining needs a randomly initialised ViT (model.name "vit" without '
                     f'a checkpoint), got model {config.model.to_dict()}')
  target = vit.checkpoint_dir(config.data.name, cache)
  if (target / vit.CONFIG_FILE).exists() and not force:
    return target
  summary = train(config, workdir, resume=True)
  model = models.build(config.model, config.seed)
  adapter, frozen, state, head, _ = load_adapter(pathlib.Path(workdir) / 'adapter', model.params)
  info = {'num_classes': int(head['bias'].shape[0]), 'data': config.data.name,
          'summary': summary, 'train_config': json.loads(config.to_json_best_effort())}
  return vit.save_pretrained(target, model.module.config, merge(adapter, frozen, state), head,
                             info)


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from peftjax.models import vit  # pylint: disable=g-import-not-at-top
  config = cli.loaded(flags.FLAGS.config)
  target = cli.run_cleanly(lambda: pretrain(config, flags.FLAGS.workdir,
                                            force=flags.FLAGS.force))
  info = vit.read_info(target)
  print(f"ViT checkpoint {target}: test accuracy {info['summary']['test_accuracy']:.4f} on "
        f"{info['data']}")


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse)
