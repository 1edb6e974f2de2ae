"""Measures a trained run's adapter on any split or domain, without training.

  python -m experiments.evaluate --workdir=runs/minilm_vader_lora [--config.data.domain=tweets] [--splits=test,val] [--output=FILE]

The config is the run's own (`WORKDIR/config.json`), changed by any `--config.KEY=VALUE`;
the adapter is `WORKDIR/adapter`. Prints the metrics and writes them as JSON to `--output`
(default `WORKDIR/eval/DOMAIN.json`, or `WORKDIR/eval/metrics.json` for a data set without
domains).
"""
from __future__ import annotations

import json
import pathlib
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'a finished run: its config.json and adapter/')
_SPLITS = flags.DEFINE_list('splits', ['test'], 'splits to measure')
_OUTPUT = flags.DEFINE_string('output', None, 'JSON file for the metrics')
flags.mark_flags_as_required(['workdir'])


def saved_config(argv) -> ml_collections.ConfigDict:
  """The config.json of the --workdir in `argv` (read before the flags are parsed, so that
  `--config.KEY=VALUE` can change it)."""
  values = [a.split('=', 1)[1] for a in argv if a.startswith('--workdir=')]
  if not values:
    sys.exit('error: --workdir=DIR (a finished run) is required')
  path = pathlib.Path(values[-1]) / 'config.json'
  if not path.exists():
    sys.exit(f'error: {path} does not exist: --workdir must be a run made by experiments.run')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from peftjax.train.loop import evaluate_adapter  # pylint: disable=g-import-not-at-top
  config, workdir = flags.FLAGS.config, pathlib.Path(_WORKDIR.value)
  metrics = cli.run_cleanly(
      lambda: evaluate_adapter(config, workdir / 'adapter', tuple(_SPLITS.value)))
  domain = config.data.get('domain')
  out = {'workdir': str(workdir), 'data': config.data.to_dict(), 'metrics': metrics}
  path = pathlib.Path(_OUTPUT.value or workdir / 'eval' / f'{domain or "metrics"}.json')
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=2) + '\n')
  for split, values in metrics.items():
    print(f'{config.data.name}{"/" + domain if domain else ""} {split}: '
          + ', '.join(f'{k} {v:.4f}' for k, v in values.items()))
  print(f'written to {path}')


if __name__ == '__main__':
  config_flags.DEFINE_config_dict('config', saved_config(sys.argv), lock_config=True)
  app.run(main, flags_parser=cli.parse)
