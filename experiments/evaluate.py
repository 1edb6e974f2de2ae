"""Measures a trained run's adapter, or a config's model as it is, on any split or domain.

  python -m experiments.evaluate --workdir=runs/minilm_vader_lora [--config.data.domain=tweets] [--splits=test,val] [--output=FILE]
  python -m experiments.evaluate --config=configs/smollm2_austen.py [--splits=test] [--output=FILE]
  python -m experiments.evaluate --workdir=runs/minilm_vader_adapter --bits=8,4,2,1
  python -m experiments.evaluate --config=configs/minilm_vader_lora.py --adapter=HF_DIR

With `--workdir`, the config is the run's own (`WORKDIR/config.json`), changed by any
`--config.KEY=VALUE`, and the adapter is `WORKDIR/adapter`; with a config file alone, its
model is measured without an adapter (e.g. a pretrained LM's held-out loss). Prints the
metrics and writes them as JSON to `--output` (default `WORKDIR/eval/DOMAIN.json`, or
`WORKDIR/eval/metrics.json` for a data set without domains; `runs/eval/CONFIG.json` without a
workdir). `--adapter=DIR` measures another adapter folder instead: peftjax's, or an HF PEFT
LoRA adapter (imported by `peftjax.io.hf_peft`; docs/hf_peft.md), on the model of the
config (or of the run).

With `--bits`, the run's adapter is also quantised after training to each number of bits
(`pj.low_precision`, Jie et al., 2023), saved to `WORKDIR/eval/bits_K/` and measured; a table
of bits, adapter file bytes and each split's accuracy (or first metric) is printed and written
to `WORKDIR/eval/bits.json`.
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
_BITS = flags.DEFINE_list('bits', [], 'also quantise the adapter to these bits (1, 2, 4, 8)')
_ADAPTER = flags.DEFINE_string('adapter', None, 'an adapter folder to measure instead of '
                               'WORKDIR/adapter: peftjax\'s or an HF PEFT LoRA adapter')


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from peftjax.train.loop import evaluate_adapter  # pylint: disable=g-import-not-at-top
  config = cli.loaded(flags.FLAGS.config)
  workdir = pathlib.Path(_WORKDIR.value) if _WORKDIR.value else None
  config_file = '' if workdir else flags.FLAGS['config'].config_filename
  adapter = workdir / 'adapter' if workdir else None
  if _ADAPTER.value:
    if _BITS.value:
      raise app.UsageError('--bits quantises the run\'s own adapter: drop --adapter')
    adapter = pathlib.Path(_ADAPTER.value)
  if _BITS.value:
    if workdir is None:
      raise app.UsageError('--bits quantises a trained run\'s adapter: give --workdir')
    bits = [int(b) for b in _BITS.value]
    rows = cli.run_cleanly(lambda: evaluate_bits(config, workdir, bits, tuple(_SPLITS.value)))
    path = pathlib.Path(_OUTPUT.value or workdir / 'eval' / 'bits.json')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'workdir': str(workdir), 'rows': rows}, indent=2) + '\n')
    print(bits_table(rows))
    print(f'written to {path}')
    return
  metrics = cli.run_cleanly(lambda: evaluate_adapter(config, adapter, tuple(_SPLITS.value)))
  domain = config.data.get('domain')
  out = {'workdir': str(workdir or ''), 'adapter': str(adapter or ''),
         'data': config.data.to_dict(), 'metrics': metrics}
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


def evaluate_bits(config, workdir: pathlib.Path, bits, splits) -> list[dict]:
  """Rows `{bits, bytes, metrics}`: the run's adapter as trained (32 bits) and quantised
  after training to each of `bits`, each file saved under `WORKDIR/eval/bits_K/`."""
  import peftjax as pj  # pylint: disable=g-import-not-at-top
  from peftjax import tasks  # pylint: disable=g-import-not-at-top
  from peftjax.io.adapter_file import WEIGHTS_FILE  # pylint: disable=g-import-not-at-top
  from peftjax.train.loop import evaluate_adapter  # pylint: disable=g-import-not-at-top
  task = tasks.build(config)
  trained = workdir / 'adapter'
  adapter, frozen, state, head, meta = pj.load_adapter(trained, task.model.params)
  if meta['method']['method'] == 'low_precision':
    raise ValueError(f"the adapter in {trained} is already quantised to "
                     f"{meta['method']['bits']} bits; --bits quantises a full-precision adapter")
  rows = [{'bits': 32, 'bytes': (trained / WEIGHTS_FILE).stat().st_size,
           'metrics': evaluate_adapter(config, trained, splits, task=task)}]
  for k in bits:
    directory = workdir / 'eval' / f'bits_{k}'
    weights = pj.save_adapter(directory, pj.low_precision(adapter, k), frozen, state,
                              head=head, base_model=meta['base_model'])
    rows.append({'bits': k, 'bytes': weights.stat().st_size,
                 'metrics': evaluate_adapter(config, directory, splits, task=task)})
  return rows


def bits_table(rows) -> str:
  """A markdown table: bits, adapter file bytes, and per split its accuracy (or first
  metric)."""
  splits = list(rows[0]['metrics'])
  metric = lambda values: 'accuracy' if 'accuracy' in values else next(iter(values))
  names = [f'{s} {metric(rows[0]["metrics"][s])}' for s in splits]
  lines = ['| bits | adapter file bytes | ' + ' | '.join(names) + ' |',
           '|---|---|' + '---|' * len(names)]
  for row in rows:
    values = [row['metrics'][s][metric(row['metrics'][s])] for s in splits]
    lines.append(f"| {row['bits']} | {row['bytes']:,} | "
                 + ' | '.join(f'{v:.4f}' for v in values) + ' |')
  return '\n'.join(lines)


if __name__ == '__main__':
  cli.define_run_or_config(sys.argv)
  app.run(main, flags_parser=cli.parse)
