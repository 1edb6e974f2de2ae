"""Measures of finished runs: learning curves, paired comparisons over seeds, weight change.

`experiments.study` reports its studies with these, `experiments.weight_change` prints
`relative_change` per run. Every loss measure is lower-is-better; a difference is
method - baseline over paired seeds (seed s of both sides saw the same batches).
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
from scipy import stats

from peftjax.core import paths as P
from peftjax.core.leaves import materialize
from peftjax.io.adapter_file import load_adapter
from peftjax.train.metrics import MetricsLog

TARGET_SHARE = 0.9  # the target val loss: 90% of the way from the start to the baseline's end


def curve(folder) -> dict:
  """A finished run's val loss and accuracy per evaluation, and its test accuracy."""
  folder = pathlib.Path(folder)
  records = MetricsLog(folder / 'metrics.jsonl').read()
  summary = json.loads((folder / 'summary.json').read_text())
  val = sorted((r for r in records if r['kind'] == 'val'), key=lambda r: r['step'])
  return {'steps': [r['step'] for r in val], 'val_loss': [r['loss'] for r in val],
          'val_accuracy': [r['accuracy'] for r in val],
          'test_accuracy': summary['test_accuracy']}


def loss_at(c: dict, step: int) -> float:
  """The val loss of curve `c` at `step` (which must be an evaluation step)."""
  if step not in c['steps']:
    raise ValueError(f'no evaluation at step {step}; evaluations at {c["steps"]}')
  return c['val_loss'][c['steps'].index(step)]


def steps_to(c: dict, target: float, start_loss: float) -> float:
  """First step at which the val loss reaches `target` (linear between evaluations, from
  `start_loss` at step 0); inf if it never does."""
  steps, losses = [0, *c['steps']], [start_loss, *c['val_loss']]
  for i in range(1, len(steps)):
    if losses[i] <= target:
      if losses[i - 1] <= target:
        return float(steps[i - 1])
      frac = (losses[i - 1] - target) / (losses[i - 1] - losses[i])
      return steps[i - 1] + frac * (steps[i] - steps[i - 1])
  return float('inf')


def paired(diffs) -> dict:
  """Mean of paired differences with its 95% t interval (None where it is undefined)."""
  d = np.asarray(diffs, float)
  out = {'mean': float(d.mean()) if len(d) else None, 'ci': None, 'n': len(d)}
  if len(d) > 1 and np.all(np.isfinite(d)):
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    out['ci'] = [float(d.mean() - half), float(d.mean() + half)]
  return out


def compare(method: list[dict], baseline: list[dict], report_steps, start_loss,
            target: float) -> dict:
  """Paired measures of two lists of per-seed curves (the seeds both have): val loss at
  `report_steps`, steps to `target`, test accuracy, and the `verdict`."""
  n = min(len(method), len(baseline))
  method, baseline = method[:n], baseline[:n]
  out = {'seeds': n, 'target': float(target), 'loss_at': {}}
  for s in report_steps:
    m, b = [loss_at(c, s) for c in method], [loss_at(c, s) for c in baseline]
    out['loss_at'][str(s)] = {'method': m, 'baseline': b,
                              'diff': paired(np.subtract(m, b))}
  m = [steps_to(c, target, start_loss) for c in method]
  b = [steps_to(c, target, start_loss) for c in baseline]
  with np.errstate(invalid='ignore'):  # inf - inf where neither side reached the target
    out['steps_to_target'] = {'method': m, 'baseline': b, 'diff': paired(np.subtract(m, b))}
  out['test_accuracy'] = {'method': [c['test_accuracy'] for c in method],
                          'baseline': [c['test_accuracy'] for c in baseline]}
  out['verdict'] = verdict([out['steps_to_target']['diff'],
                            *(v['diff'] for v in out['loss_at'].values())])
  return out


def verdict(diffs) -> str:
  """"Converges faster" from `paired` differences (a CI below 0 favours the method):
  reproduced when one favours the method and none the baseline, not reproduced the other way
  round, inconclusive otherwise."""
  cis = [d['ci'] for d in diffs if d['ci'] is not None]
  if not cis:
    return 'inconclusive (one seed)'
  method = any(hi < 0 for _, hi in cis)
  base = any(lo > 0 for lo, _ in cis)
  if method and not base:
    return 'reproduced'
  if base and not method:
    return 'not reproduced'
  return 'inconclusive'


def relative_change(adapter_dir, params) -> dict[str, float]:
  """||W_adapted - W|| / ||W|| of every 2-D weight that the saved adapter changes, by path."""
  adapter, frozen, state, _, _ = load_adapter(adapter_dir, params)
  adapted = P.flatten(materialize(adapter.apply(frozen, state)))
  base = P.flatten(params)
  return {p: float(np.linalg.norm(np.asarray(adapted[p]) - base[p]) / np.linalg.norm(base[p]))
          for p in base if np.ndim(base[p]) == 2 and not np.array_equal(adapted[p], base[p])}
