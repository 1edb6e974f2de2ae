"""A study: several methods x seeds of one base config, then a table and a loss plot.

A study config has `base` (a run config), `runs` ({name: {method, seeds, lr}}), `report_steps`,
`window` and `only` (comma-separated run names, or '' for all); `experiments.run` hands such a
config here. Each run trains in `WORKDIR/NAME/seed_S` with `peftjax.train.loop.train`; a run
with a `summary.json` is skipped and an interrupted one resumes, so a stopped study continues.
Writes `WORKDIR/study.json`, `WORKDIR/study.md` (the table) and `WORKDIR/loss_curves.png`.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from peftjax.io.files import atomic_write_text
from peftjax.train.loop import train
from peftjax.train.metrics import MetricsLog


def selected(config) -> dict:
  runs = config.runs.to_dict()
  only = [n.strip() for n in config.only.split(',') if n.strip()]
  unknown = [n for n in only if n not in runs]
  if unknown:
    raise ValueError(f'--config.only names unknown runs {unknown}; the study has {list(runs)}')
  return {n: r for n, r in runs.items() if not only or n in only}


def run_config(config, run: dict, seed: int):
  c = config.base.copy_and_resolve_references()
  with c.unlocked():
    c.method = run['method']
    c.optimizer.lr = run['lr']
    c.seed = seed
  return c


def run_study(config, workdir) -> dict:
  workdir = pathlib.Path(workdir)
  runs = selected(config)
  total = sum(r['seeds'] for r in runs.values())
  done = 0
  for name, run in runs.items():
    for seed in range(run['seeds']):
      done += 1
      out = workdir / name / f'seed_{seed}'
      if (out / 'summary.json').exists():
        continue
      print(f'=== {name} seed {seed} ({done}/{total}) ===', flush=True)
      train(run_config(config, run, seed), out, resume=(out / 'checkpoints').exists())
  rows = {name: collect(workdir / name, run['seeds'], config.report_steps, config.window)
          for name, run in runs.items()}
  atomic_write_text(workdir / 'study.json', json.dumps(rows, indent=2))
  table = markdown(rows, config.report_steps)
  atomic_write_text(workdir / 'study.md', table + '\n')
  plot(rows, workdir / 'loss_curves.png', config.window)
  print(table)
  return rows


def collect(folder: pathlib.Path, seeds: int, report_steps, window: int) -> dict:
  """Per-seed summaries and losses of one run: loss at a step is the mean train loss of the
  `window` steps up to it."""
  summaries, curves = [], []
  for seed in range(seeds):
    summaries.append(json.loads((folder / f'seed_{seed}' / 'summary.json').read_text()))
    train_records = [r for r in MetricsLog(folder / f'seed_{seed}' / 'metrics.jsonl').read()
                     if r['kind'] == 'train']
    curves.append([r['loss'] for r in sorted(train_records, key=lambda r: r['step'])])
  n = min(map(len, curves))
  curves = np.array([c[:n] for c in curves])
  loss_at = {str(s): [float(c[s - window:s].mean()) for c in curves] for s in report_steps
             if s <= n}
  return {
      'method': summaries[0]['method'],
      'seeds': seeds,
      'trainable_params': summaries[0]['trainable_params'],
      'test_accuracy': [s['test_accuracy'] for s in summaries],
      'loss_at': loss_at,
      'steps_per_sec': [s['train_steps_per_sec'] for s in summaries],
      'mean_curve': curves.mean(axis=0).tolist(),
  }


def _mean_sd(values, fmt='{:.4f}') -> str:
  if len(values) == 1:
    return fmt.format(values[0])
  return f'{fmt.format(np.mean(values))} ± {fmt.format(np.std(values, ddof=1))}'


def markdown(rows: dict, report_steps) -> str:
  ref = rows.get('lora')
  head = ['run', 'seeds', 'trainable params', 'test accuracy',
          *[f'loss @{s}' for s in report_steps], 'Δ loss @%d vs LoRA' % report_steps[-1],
          'steps/s', '÷ LoRA steps/s']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, r in rows.items():
    last = str(report_steps[-1])
    delta = (f"{np.mean(r['loss_at'][last]) - np.mean(ref['loss_at'][last]):+.4f}"
             if ref and last in r['loss_at'] and last in ref['loss_at'] else '')
    speed = np.median(r['steps_per_sec'])
    ratio = f"{speed / np.median(ref['steps_per_sec']):.2f}" if ref else ''
    lines.append('| ' + ' | '.join([
        name, str(r['seeds']), f"{r['trainable_params']:,}", _mean_sd(r['test_accuracy']),
        *[_mean_sd(r['loss_at'][str(s)]) if str(s) in r['loss_at'] else '' for s in report_steps],
        delta, f'{speed:.2f}', ratio]) + ' |')
  return '\n'.join(lines)


def plot(rows: dict, path, window: int):
  """Seed-mean train loss per run, as a moving average over `window` steps."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(9, 5.5))
  ax.set_prop_cycle(color=plt.cm.tab20(np.linspace(0, 1, 20)))
  for name, r in rows.items():
    curve = np.asarray(r['mean_curve'])
    if len(curve) < window:
      continue
    smooth = np.convolve(curve, np.ones(window) / window, 'valid')
    ax.plot(np.arange(window, len(curve) + 1), smooth, lw=2.2 if r['seeds'] > 1 else 1.0,
            label=f"{name} ({r['seeds']} seed{'s' if r['seeds'] > 1 else ''})")
  ax.set(xlabel='step', ylabel=f'train loss (mean of seeds, moving average of {window})')
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
