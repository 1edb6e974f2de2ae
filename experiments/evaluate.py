"""Measures a trained run's adapter, or a config's model as it is, on any split or domain.

  python -m experiments.evaluate --workdir=runs/minilm_vader_lora [--config.data.domain=tweets] [--splits=test,val] [--output=FILE]
  python -m experiments.evaluate --config=configs/smollm2_austen.py [--splits=test] [--output=FILE]

With `--workdir`, the config is the run's own (`WORKDIR/config.json`), changed by any
`--config.KEY=VALUE`, and the adapter is `WORKDIR/adapter`; with a config file alone, its
model is measured without an adapter (e.g. a pretrained LM's held-out loss). Prints the
metrics and writes them as JSON to `--output` (default `WORKDIR/eval/DOMAIN.json`, or
`WORKDIR/eval/metrics.json` for a data set without domains; `runs/eval/CONFIG.json` without a
workdir).
"""
from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags, logging

from experiments import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'a finished run: its config.json and adapter/')
_SPLITS = flags.DEFINE_list('splits', ['test'], 'splits to measure')
_OUTPUT = flags.DEFINE_string('output', None, 'JSON file for the metrics')


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from peftjax.train.loop import evaluate_adapter  # pylint: disable=g-import-not-at-top
  config = cli.loaded(flags.FLAGS.config)
  workdir = pathlib.Path(_WORKDIR.value) if _WORKDIR.value else None
  config_file = '' if workdir else flags.FLAGS['config'].config_filename
  adapter = workdir / 'adapter' if workdir else None
  metrics = cli.run_cleanly(lambda: evaluate_adapter(config, adapter, tuple(_SPLITS.value)))
  domain = config.data.get('domain')
  out = {'workdir': str(workdir or ''), 'data': config.data.to_dict(), 'metrics': metrics}
  default = (workdir / 'eval' / f'{domain or "metrics"}.json' if workdir else
             pathlib.Path('runs/eval') / f'{pathlib.Path(config_file).stem}.json')
  path = pathlib.Path(_OUTPUT.value or default)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=2) + '\n')
  for split, values in metrics.items():
    print(f'{config.data.get("name") or config.data.get("corpus")}'
          f'{"/" + domain if domain else ""} {split}: '
          + ', '.join(f'{k} {v:.4f}' for k, v in values.items()))
  print(f'written to {path}')


if __name__ == '__main__':
  cli.define_run_or_config(sys.argv)
  app.run(main, flags_parser=cli.parse)
