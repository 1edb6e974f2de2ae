"""A paired study: does a method converge faster than its baseline, each at its best lr?

A study config has `base` (a run config), `probe` (the head stage: `lr`, `epochs`),
`methods` ({name: method config}), `lrs` (the sweep), `pairs` ({key: {title, method,
baseline, seeds}}, in the order they run), `matched_seeds`, `report_steps` and `only`
(comma-separated pair keys, or '' for all); `experiments.run` hands such a config here. For each pair in turn:

1. the probe (once): the task head alone on the frozen model, in `WORKDIR/probe`; every
   other run starts from its head (`head.init`), so data-driven inits calibrate through a
   trained head and every run starts from the probe's function;
2. the sweep: baseline and method at every lr of `lrs`, seed 0;
3. each one's best lr (lowest final val loss of seed 0), then seeds 1..n-1 of the baseline
   at its best lr, of the method at its own best lr (the best-vs-best comparison) and, up to
   `matched_seeds`, of the method at the baseline's lr (the matched comparison).

Runs live in `WORKDIR/NAME/lr_LR/seed_S`; a run with a `summary.json` is skipped and an
interrupted one resumes, so a stopped study continues. Writes `WORKDIR/study.json`,
`WORKDIR/study.md` (sweep table, pair table, verdicts) and `WORKDIR/study.png` (one panel
per pair: seed-mean val loss against steps, band = min..max over seeds).

Paired measures (`peftjax.analysis`; seed s of both sides sees the same batches): the val
loss at `report_steps`, and the steps to reach the pair's target val loss, 90% of the way from
the start to the baseline's seed-mean final val loss (linear between evaluations; step 0 is
the probe's val loss, which every run starts from). Differences are method - baseline with a
95% t interval over seeds. Verdict on "converges faster": reproduced when an interval favours
the method and none favours the baseline, not reproduced when an interval favours the
baseline and none the method, inconclusive otherwise.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from peftjax.analysis import TARGET_SHARE, compare, curve
from peftjax.io.files import atomic_write_text
from peftjax.train.loop import train


# ------------------------------------------------------------------------------- running
def selected(config) -> dict:
  pairs = config.pairs.to_dict()
  only = [n.strip() for n in config.only.split(',') if n.strip()]
  unknown = [n for n in only if n not in pairs]
  if unknown:
    raise ValueError(f'--config.only names unknown pairs {unknown}; the study has {list(pairs)}')
  for key, pair in pairs.items():
    for side in ('method', 'baseline'):
      if pair[side] not in config.methods:
        raise ValueError(f'pair {key!r}: {side} {pair[side]!r} is not in methods '
                         f'{list(config.methods)}')
  return {k: p for k, p in pairs.items() if not only or k in only}


def run_dir(workdir, name: str, lr: float, seed: int) -> pathlib.Path:
  return pathlib.Path(workdir) / name / f'lr_{lr:.0e}' / f'seed_{seed}'


def probe_config(config):
  c = config.base.copy_and_resolve_references()
  with c.unlocked():
    c.method = {'name': 'probe'}
    c.optimizer.lr = config.probe.lr
    c.train.epochs = config.probe.epochs
    c.train.eval_every = 0
  return c


def run_config(config, workdir, name: str, lr: float, seed: int):
  c = config.base.copy_and_resolve_references()
  with c.unlocked():
    c.method = config.methods[name].to_dict()
    c.optimizer.lr = lr
    c.seed = seed
    c.head.init = str((pathlib.Path(workdir) / 'probe' / 'adapter').absolute())
  return c


def _train(c, out: pathlib.Path, label: str):
  if (out / 'summary.json').exists():
    return
  print(f'=== {label} ===', flush=True)
  train(c, out, resume=(out / 'checkpoints').exists())


def run_study(config, workdir) -> dict:
  workdir = pathlib.Path(workdir)
  pairs = selected(config)
  _train(probe_config(config), workdir / 'probe', 'probe')
  for key, pair in pairs.items():
    for name in (pair['baseline'], pair['method']):
      for lr in config.lrs:
        _train(run_config(config, workdir, name, lr, 0), run_dir(workdir, name, lr, 0),
               f'{key}: sweep {name} lr {lr:g}')
    for name, lr, seeds in plan(config, workdir, pair):
      for seed in range(1, seeds):
        _train(run_config(config, workdir, name, lr, seed), run_dir(workdir, name, lr, seed),
               f'{key}: {name} lr {lr:g} seed {seed}')
  return report(config, workdir)


def best_lr(config, workdir, name: str) -> float:
  """The sweep's lr with the lowest final val loss (seed 0)."""
  return min(config.lrs, key=lambda lr: curve(run_dir(workdir, name, lr, 0))['val_loss'][-1])


def plan(config, workdir, pair) -> list[tuple[str, float, int]]:
  """(name, lr, seeds) of the pair's runs, in order: the baseline at its best lr, the method
  at its own best lr, and the method at the baseline's lr where that differs."""
  lb, lm = best_lr(config, workdir, pair['baseline']), best_lr(config, workdir, pair['method'])
  n = pair['seeds']
  return [(pair['baseline'], lb, n), (pair['method'], lm, n)] + (
      [(pair['method'], lb, min(n, config.matched_seeds))] if lm != lb else [])


# ------------------------------------------------------------------------------- reporting
def report(config, workdir) -> dict:
  workdir = pathlib.Path(workdir)
  pairs = selected(config)
  start_loss = curve(workdir / 'probe')['val_loss'][-1]
  sweep, results = {}, {}
  for key, pair in pairs.items():
    for name in (pair['baseline'], pair['method']):
      sweep.setdefault(name, {f'{lr:.0e}': curve(run_dir(workdir, name, lr, 0))
                              for lr in config.lrs
                              if (run_dir(workdir, name, lr, 0) / 'summary.json').exists()})
    if any(len(sweep[n]) < len(config.lrs) for n in (pair['baseline'], pair['method'])):
      continue  # the sweep of this pair is not finished
    lb = best_lr(config, workdir, pair['baseline'])
    lm = best_lr(config, workdir, pair['method'])

    def seeds(name, lr):
      return [curve(run_dir(workdir, name, lr, s)) for s in range(pair['seeds'])
              if (run_dir(workdir, name, lr, s) / 'summary.json').exists()]

    results[key] = {
        **pair, 'baseline_lr': lb, 'method_lr': lm,
        'curves': {'baseline': seeds(pair['baseline'], lb), 'matched': seeds(pair['method'], lb),
                   'best': seeds(pair['method'], lm)},
    }
    r = results[key]
    final = np.mean([c['val_loss'][-1] for c in r['curves']['baseline']])
    target = start_loss - TARGET_SHARE * (start_loss - final)
    for kind in ('matched', 'best'):
      r[kind] = compare(r['curves'][kind], r['curves']['baseline'], config.report_steps,
                        start_loss, target)
  out = {'probe_val_loss': start_loss, 'sweep': sweep, 'pairs': results}
  atomic_write_text(workdir / 'study.json', json.dumps(out, indent=1))
  table = markdown(config, out)
  atomic_write_text(workdir / 'study.md', table + '\n')
  if results:
    plot(results, workdir / 'study.png', start_loss)
  print(table)
  return out


def _ci(d: dict, fmt='{:+.4f}') -> str:
  if d['mean'] is None:
    return ''
  if not np.isfinite(d['mean']):
    return 'never reached' if d['n'] == 1 else 'not reached in every seed'
  ci = '' if d['ci'] is None else f" [{fmt.format(d['ci'][0])}, {fmt.format(d['ci'][1])}]"
  return fmt.format(d['mean']) + ci


def _mean(values, fmt='{:.4f}') -> str:
  """mean ± sd; values that are inf (a target never reached) are counted, not averaged."""
  values = np.asarray(values, float)
  finite, never = values[np.isfinite(values)], int(np.sum(~np.isfinite(values)))
  if not len(finite):
    return 'never'
  if never:
    return f'{fmt.format(finite.mean())} ({never} never)'
  return fmt.format(finite.mean()) + (f' ± {fmt.format(finite.std(ddof=1))}'
                                      if len(finite) > 1 else '')


def markdown(config, out: dict) -> str:
  lrs = [f'{lr:.0e}' for lr in config.lrs]
  lines = ['Sweep (seed 0): final val loss / val accuracy; **bold** = best lr', '',
           '| run | ' + ' | '.join(f'lr {lr}' for lr in lrs) + ' |',
           '|---|' + '---|' * len(lrs)]
  for name, runs in out['sweep'].items():
    finals = {lr: c['val_loss'][-1] for lr, c in runs.items()}
    best = min(finals, key=finals.get) if len(finals) == len(lrs) else None
    cells = []
    for lr in lrs:
      if lr not in runs:
        cells.append('')
        continue
      cell = f"{runs[lr]['val_loss'][-1]:.4f} / {runs[lr]['val_accuracy'][-1]:.4f}"
      cells.append(f'**{cell}**' if lr == best else cell)
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  steps = [str(s) for s in config.report_steps]
  lines += ['', f"Pairs (val loss starts at the probe's {out['probe_val_loss']:.4f}); "
            'Δ = method − baseline, mean [95% CI] over paired seeds', '',
            '| pair | comparison | lr (method / baseline) | seeds | '
            + ' | '.join(f'val loss @{s} (method / baseline)' for s in steps)
            + ' | ' + ' | '.join(f'Δ @{s}' for s in steps)
            + ' | target | steps to target (method / baseline) | Δ steps | '
            'test acc (method / baseline) | verdict |',
            '|' + '---|' * (9 + 2 * len(steps))]
  for key, r in out['pairs'].items():
    for kind, lr in (('matched', r['baseline_lr']), ('best', r['method_lr'])):
      if kind == 'best' and r['method_lr'] == r['baseline_lr']:
        continue
      c = r[kind]
      la = c['loss_at']
      lines.append('| ' + ' | '.join([
          r['title'], 'matched lr' if kind == 'matched' else 'each at its best lr',
          f"{lr:.0e} / {r['baseline_lr']:.0e}", str(c['seeds']),
          *[f"{_mean(la[s]['method'])} / {_mean(la[s]['baseline'])}" for s in steps],
          *[_ci(la[s]['diff']) for s in steps],
          f"{c['target']:.4f}",
          f"{_mean(c['steps_to_target']['method'], '{:.0f}')} / "
          f"{_mean(c['steps_to_target']['baseline'], '{:.0f}')}",
          _ci(c['steps_to_target']['diff'], '{:+.0f}'),
          f"{_mean(c['test_accuracy']['method'])} / {_mean(c['test_accuracy']['baseline'])}",
          c['verdict']]) + ' |')
  return '\n'.join(lines)


def plot(results: dict, path, start_loss: float):
  """One panel per pair: seed-mean val loss against steps, band = min..max over seeds."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  cols = min(3, len(results))
  rows = -(-len(results) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
  for ax, (key, r) in zip(axes.flat, results.items()):
    sides = [('baseline', f"{r['baseline']} (lr {r['baseline_lr']:.0e})", 'tab:gray', '-'),
             ('matched', f"{r['method']} (lr {r['baseline_lr']:.0e})", 'tab:blue', '-')]
    if r['method_lr'] != r['baseline_lr']:
      sides.append(('best', f"{r['method']} (lr {r['method_lr']:.0e}, its best)", 'tab:orange',
                    '--'))
    for kind, label, color, style in sides:
      curves = r['curves'][kind]
      if not curves:
        continue
      steps = np.array([0, *curves[0]['steps']])
      losses = np.array([[start_loss, *c['val_loss']] for c in curves])
      ax.plot(steps, losses.mean(0), style, color=color,
              label=f'{label}, {len(curves)} seed{"s" * (len(curves) > 1)}')
      ax.fill_between(steps, losses.min(0), losses.max(0), color=color, alpha=0.2)
    ax.set(title=r['title'], xlabel='step', ylabel='val loss')
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(results):]:
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
