"""Runs side by side: one table of their accuracy, size, peak memory and speed.

A compare config has `runs` (name -> a run config, or a chain of stages; run in that order),
`rows` (table label -> 'RUN' or 'RUN/STAGE', in table order), `baseline` (the row that the
memory and speed ratios divide by), `compose`, `recovery`, `seeds`, `differences` and
`only` (comma-separated run names, or '' for all); `experiments.run` hands such a config here.

Every run, and every stage of a chain, trains in a fresh process of its own, so that its peak
resident memory (VmHWM: everything the process held, data and compiled code included) is its
own; it lands in `resources.json` next to the run's `summary.json`. A finished run is skipped
and an interrupted one resumes (its peak and wall time are then the resumed process's), so a
stopped study continues. A string in a run's config may
hold `{workdir}`, the study's workdir (a run that grafts another run's adapter).

- `compose` ({'parts': (row, ...)} or empty): rows of sparse fine-tunings (`sparse_ft`), each
  with its own task head and data. Each part is measured alone (its run's test metrics) and
  composed: its adapter on the base plus the sparse differences of all the other parts
  (`peftjax.methods.sparse.compose`), with its own head on its own test split.
- `recovery` ({'row', 'full', 'probe'} or empty): a grafting run (`graft`), its mask rounded
  (γ > 1/2, `binarized_graft`) and measured with the run's head; recovery is (accuracy - the
  probe's) / (the full fine-tuning's - the probe's) on the test split, next to the fraction
  of the targeted entries grafted.
- `seeds` ({label: (run, ...)} or empty): the same row trained with different seeds; its test
  accuracy's mean with a 95% t interval. `differences` ((label, label), ...): each pair's
  test accuracy difference (first minus second), paired by position (seed), mean and interval.

Writes `WORKDIR/compare.json` and `WORKDIR/compare.md`.

  python -m experiments.compare JOB.json   (one run's process; the study starts these)
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import ml_collections
import numpy as np

from peftjax.analysis import paired
from peftjax.io.files import atomic_write_text

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESOURCES = 'resources.json'


# ------------------------------------------------------------------------------- running
def jobs(config, workdir) -> list[tuple[str, pathlib.Path, dict]]:
  """`(label, directory, job)` of every process the study runs, in order: one per run, one
  per stage of a chain (the chain cut after that stage, so earlier stages are skipped)."""
  workdir = pathlib.Path(workdir)
  only = [n.strip() for n in config.only.split(',') if n.strip()]
  unknown = [n for n in only if n not in config.runs]
  if unknown:
    raise ValueError(f'--config.only names unknown runs {unknown}; the study has '
                     f'{list(config.runs)}')
  out = []
  for name, run in config.runs.items():
    if only and name not in only:
      continue
    run = filled(run.to_dict(), str(workdir.absolute()))
    if 'stages' in run:
      order = list(run['stage_order'])
      for i, stage in enumerate(order):
        cut = {'stage_order': order[:i + 1],
               'stages': {s: run['stages'][s] for s in order[:i + 1]}}
        following = run['stages'][order[i + 1]] if i + 1 < len(order) else {}
        out.append((f'{name}/{stage}', workdir / name / stage,
                    {'config': cut, 'workdir': str(workdir / name), 'stage': stage,
                     'merge': following.get('start', 'merged') in ('merged', 'reference')
                              if following else False}))
    else:
      out.append((name, workdir / name, {'config': run, 'workdir': str(workdir / name)}))
  return out


def filled(value, workdir: str):
  """`value` with `{workdir}` in every string replaced."""
  if isinstance(value, dict):
    return {k: filled(v, workdir) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(filled(v, workdir) for v in value)
  return value.replace('{workdir}', workdir) if isinstance(value, str) else value


def run_compare(config, workdir) -> dict:
  workdir = pathlib.Path(workdir)
  check_rows(config)
  for label, directory, job in jobs(config, workdir):
    if (directory / 'summary.json').exists():
      continue
    print(f'=== {label} ===', flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / 'job.json'
    atomic_write_text(path, json.dumps(job, indent=1))
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT), env.get('PYTHONPATH')]))
    code = subprocess.run([sys.executable, '-m', 'experiments.compare', str(path)], cwd=ROOT,
                          env=env, check=False).returncode
    if code:
      raise RuntimeError(f'{label} failed (exit {code}); its output is above, and rerunning '
                         'the command resumes it')
  return report(config, workdir)


def run_job(path) -> None:
  """One run (or one stage) in this process; writes its peak RSS and wall time."""
  from experiments.bench_torch import peak_rss_gb  # pylint: disable=g-import-not-at-top
  job = json.loads(pathlib.Path(path).read_text())
  config = ml_collections.ConfigDict(job['config'])
  start = time.perf_counter()
  if job.get('stage'):
    from peftjax.train import stages  # pylint: disable=g-import-not-at-top
    stages.run_stages(config, job['workdir'])
    directory = pathlib.Path(job['workdir']) / job['stage']
  else:
    from peftjax.train.loop import train  # pylint: disable=g-import-not-at-top
    directory = pathlib.Path(job['workdir'])
    train(config, directory, resume=True)
  resources = {'peak_rss_gb': peak_rss_gb(), 'wall_s': time.perf_counter() - start}
  if job.get('merge'):  # what the next stage starts from, written here: not in its peak
    stages.merged(config.stages[job['stage']], directory)
  atomic_write_text(directory / RESOURCES, json.dumps(resources, indent=1))


def check_rows(config) -> None:
  """Rows must name runs (or stages) of the study; the other keys, rows."""
  names = set()
  for name, run in config.runs.items():
    names |= {f'{name}/{s}' for s in run.stage_order} if 'stages' in run else {name}
  bad = {label: run for label, run in config.rows.items() if run not in names}
  if bad:
    raise ValueError(f'rows name runs the study lacks: {bad}; it has {sorted(names)}')
  labels = [config.baseline, *config.compose.get('parts', ()), *config.recovery.values()]
  missing = [label for label in labels if label not in config.rows]
  if missing:
    raise ValueError(f'baseline, compose and recovery name rows; {missing} are not among the '
                     f'rows {list(config.rows)}')
  seeds = config.get('seeds', {})
  bad = {label: [r for r in runs if r not in names] for label, runs in seeds.items()}
  if any(bad.values()):
    raise ValueError(f'seeds name runs the study lacks: {bad}; it has {sorted(names)}')
  unknown = [l for pair in config.get('differences', ()) for l in pair if l not in seeds]
  if unknown:
    raise ValueError(f'differences name {unknown}, which are not labels of seeds '
                     f'{list(seeds)}')


# ------------------------------------------------------------------------------- reporting
def _read(path: pathlib.Path):
  return json.loads(path.read_text()) if path.exists() else None


def report(config, workdir) -> dict:
  workdir = pathlib.Path(workdir)
  rows = {}
  for label, run in config.rows.items():
    summary = _read(workdir / run / 'summary.json')
    if summary is not None:
      rows[label] = {'run': run, **summary, **(_read(workdir / run / RESOURCES) or {}),
                     'model_params': model_params(_run_config(workdir, run).model)}
  out = {'rows': rows, 'baseline': config.baseline}
  done = lambda *labels: all(label in rows for label in labels)  # noqa: E731
  parts = tuple(config.compose.get('parts', ()))
  if parts and done(*parts):
    out['compose'] = cached(workdir / 'compose.json', lambda: composed(config, workdir, parts))
  rec = config.recovery.to_dict()
  if rec and done(rec['row'], rec['full'], rec['probe']):
    out['recovery'] = cached(workdir / 'recovery.json', lambda: recovered(config, workdir, rec))
  if config.get('seeds'):
    out['seeds'], out['differences'] = seeded(config, workdir)
  atomic_write_text(workdir / 'compare.json', json.dumps(out, indent=1))
  table = markdown(out)
  atomic_write_text(workdir / 'compare.md', table + '\n')
  print(table)
  return out


def model_params(model_config) -> int:
  """The parameter count of the model a run adapts (its summary's `total_params` also
  counts what its frozen tree holds besides, e.g. grafting's fine-tuned copy)."""
  key = json.dumps(model_config.to_dict(), sort_keys=True)
  if key not in _MODEL_PARAMS:
    from peftjax import models  # pylint: disable=g-import-not-at-top
    from peftjax.core.adapter import num_params  # pylint: disable=g-import-not-at-top
    _MODEL_PARAMS[key] = num_params(models.build(model_config).params)
  return _MODEL_PARAMS[key]


_MODEL_PARAMS: dict[str, int] = {}


def cached(path: pathlib.Path, make):
  if not path.exists():
    atomic_write_text(path, json.dumps(make(), indent=1))
  return json.loads(path.read_text())


def _run_config(workdir, run: str):
  return ml_collections.ConfigDict(json.loads((workdir / run / 'config.json').read_text()))


def composed(config, workdir, parts) -> dict:
  """Each part alone and on the base plus the other parts' sparse differences."""
  from peftjax import models  # pylint: disable=g-import-not-at-top
  from peftjax.io.adapter_file import load_adapter  # pylint: disable=g-import-not-at-top
  from peftjax.io.params_file import save_params  # pylint: disable=g-import-not-at-top
  from peftjax.methods.sparse import compose, difference  # pylint: disable=g-import-not-at-top
  from peftjax.train.loop import evaluate_adapter  # pylint: disable=g-import-not-at-top
  runs = {label: config.rows[label] for label in parts}
  configs = {label: _run_config(workdir, run) for label, run in runs.items()}
  base = models.build(configs[parts[0]].model, configs[parts[0]].seed).params
  diffs = {}
  for label, run in runs.items():
    adapter, frozen, state, _, _ = load_adapter(workdir / run / 'adapter', base)
    if adapter.config['method'] != 'sparse_ft':
      raise ValueError(f'compose: row {label!r} ({run}) is {adapter.config["method"]}; '
                       'composition takes sparse_ft runs')
    diffs[label] = difference(frozen, state)
  out = {}
  for label, run in runs.items():
    others = compose(base, *(d for other, d in diffs.items() if other != label))
    path = save_params(workdir / 'compose' / f'without_{run.replace("/", "_")}.safetensors',
                       others)
    c = configs[label].copy_and_resolve_references()
    with c.unlocked():
      c.model.init = str(path)
    summary = json.loads((workdir / run / 'summary.json').read_text())
    out[label] = {'domain': c.data.get('domain'), 'alone': summary['test_accuracy'],
                  'composed': evaluate_adapter(c, workdir / run / 'adapter')['test']['accuracy']}
  return out


def recovered(config, workdir, rec: dict) -> dict:
  """The grafting row's binarised mask: its accuracy and its recovery of full FT's gain."""
  import jax  # pylint: disable=g-import-not-at-top
  from peftjax import models  # pylint: disable=g-import-not-at-top
  from peftjax.io.adapter_file import load_adapter  # pylint: disable=g-import-not-at-top
  from peftjax.io.params_file import save_params  # pylint: disable=g-import-not-at-top
  from peftjax.methods.grafting import binarized_graft  # pylint: disable=g-import-not-at-top
  from peftjax.train.loop import evaluate_adapter  # pylint: disable=g-import-not-at-top
  run = config.rows[rec['row']]
  c = _run_config(workdir, run)
  base = models.build(c.model, c.seed).params
  adapter, frozen, state, _, _ = load_adapter(workdir / run / 'adapter', base)
  _, start = adapter.init(jax.random.key(c.seed), base)  # γ at init: the base patch

  def accuracy(state, name):
    params, used = binarized_graft(adapter, frozen, state)
    cc = c.copy_and_resolve_references()
    with cc.unlocked():
      cc.model.init = str(save_params(workdir / run / f'{name}.safetensors', params))
    return evaluate_adapter(cc, None, head_from=workdir / run / 'adapter')['test']['accuracy'], used

  acc, used = accuracy(state, 'binarized')
  patch_acc, patch_used = accuracy(start, 'base_patch')
  full, probe = (json.loads((workdir / config.rows[rec[k]] / 'summary.json').read_text())
                 ['test_accuracy'] for k in ('full', 'probe'))
  return {'grafted_fraction': used, 'accuracy': acc, 'relaxed_accuracy':
          json.loads((workdir / run / 'summary.json').read_text())['test_accuracy'],
          'base_patch_fraction': patch_used, 'base_patch_accuracy': patch_acc,
          'full_accuracy': full, 'probe_accuracy': probe,
          'recovery': (acc - probe) / (full - probe) if full != probe else None}


def seeded(config, workdir: pathlib.Path) -> tuple[dict, list]:
  """Per label of `seeds`: the finished runs' test accuracies, their mean and 95% interval;
  per pair of `differences` (both complete), the paired difference."""
  accuracies = {}
  for label, runs in config.seeds.items():
    found = [_read(workdir / run / 'summary.json') for run in runs]
    accuracies[label] = [f['test_accuracy'] for f in found if f is not None]
  seeds = {label: {'runs': list(config.seeds[label]), 'test_accuracy': acc,
                   'mean': paired(acc)['mean'], 'ci': paired(acc)['ci']}
           for label, acc in accuracies.items()}
  differences = [
      {'first': a, 'second': b, **paired(np.subtract(accuracies[a], accuracies[b]))}
      for a, b in config.get('differences', ())
      if len(accuracies[a]) == len(accuracies[b]) == len(config.seeds[a]) == len(config.seeds[b])]
  return seeds, differences


def _interval(ci) -> str:
  return f'[{ci[0]:+.4f}, {ci[1]:+.4f}]' if ci else ''


def _ratio(value, reference, fmt='{:.2f}×') -> str:
  return fmt.format(value / reference) if value and reference else ''


def markdown(out: dict) -> str:
  rows, base = out['rows'], out['rows'].get(out['baseline'], {})
  lines = ['| run | method | test acc | val acc | trainable (% of the model) | adapter bytes | '
           f'peak RSS GB (× {out["baseline"]}) | steps/s (× {out["baseline"]}) |',
           '|---|---|---|---|---|---|---|---|']
  for label, r in rows.items():
    share = 100 * r['trainable_params'] / r['model_params']
    peak = r.get('peak_rss_gb')
    lines.append(
        f"| {label} | {r['method']} | {r['test_accuracy']:.4f} | {r['val_accuracy']:.4f} | "
        f"{r['trainable_params']:,} ({share:.3g}%) | {r['adapter_bytes']:,} | "
        + (f"{peak:.2f} ({_ratio(peak, base.get('peak_rss_gb'))})" if peak else '') + ' | '
        + f"{r['train_steps_per_sec']:.2f} ({_ratio(r['train_steps_per_sec'], base.get('train_steps_per_sec'))}) |")
  if 'compose' in out:
    lines += ['', 'Composition: each sparse difference alone, and added to the others '
              '(its own head, its own test split)', '',
              '| part | domain | test acc alone | test acc composed |', '|---|---|---|---|']
    lines += [f"| {k} | {v['domain']} | {v['alone']:.4f} | {v['composed']:.4f} |"
              for k, v in out['compose'].items()]
  if 'recovery' in out:
    r = out['recovery']
    lines += ['', f"Grafting: the rounded mask (γ > 1/2) grafts {100 * r['grafted_fraction']:.3g}% "
              f"of the targeted entries; test acc {r['accuracy']:.4f} (relaxed mask "
              f"{r['relaxed_accuracy']:.4f}; the base patch it starts from, "
              f"{100 * r['base_patch_fraction']:.3g}% of the entries: "
              f"{r['base_patch_accuracy']:.4f}) against the probe's {r['probe_accuracy']:.4f} and "
              f"full fine-tuning's {r['full_accuracy']:.4f}: "
              + (f"it recovers {100 * r['recovery']:.1f}% of full fine-tuning's gain."
                 if r['recovery'] is not None else 'full fine-tuning gained nothing.')]
  if out.get('seeds'):
    lines += ['', 'Seeds: test accuracy over seeds, mean and 95% t interval', '',
              '| row | seeds | test acc mean | 95% interval | each |', '|---|---|---|---|---|']
    for label, r in out['seeds'].items():
      each = ', '.join(f'{a:.4f}' for a in r['test_accuracy'])
      mean = f"{r['mean']:.4f}" if r['mean'] is not None else ''
      interval = f"[{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]" if r['ci'] else ''
      lines.append(f"| {label} | {len(r['test_accuracy'])}/{len(r['runs'])} | {mean} | "
                   f'{interval} | {each} |')
  if out.get('differences'):
    lines += ['', 'Paired differences of test accuracy (first - second, by seed)', '',
              '| first | second | seeds | mean difference | 95% interval |', '|---|---|---|---|---|']
    lines += [f"| {d['first']} | {d['second']} | {d['n']} | {d['mean']:+.4f} | "
              f"{_interval(d['ci'])} |" for d in out['differences']]
  return '\n'.join(lines)


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit('usage: python -m experiments.compare JOB.json (the study starts these; run a '
             'study with python -m experiments.run --config=... --workdir=...)')
  run_job(sys.argv[1])
