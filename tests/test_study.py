"""The paired study driver (`experiments.run --config=configs/lowrank_study.py:tiny`) and the
measures it reports with (`peftjax.analysis`)."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import lowrank_study
from peftjax import analysis

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _study(workdir, *overrides, timeout=1200):
  return subprocess.run([sys.executable, '-m', 'experiments.run',
                         '--config=configs/lowrank_study.py:tiny', f'--workdir={workdir}',
                         *overrides], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, check=False)


def _run(workdir, name: str, lr: float, seed: int) -> pathlib.Path:
  return workdir / name / f'lr_{lr:.0e}' / f'seed_{seed}'


@pytest.mark.long
def test_study_sweeps_picks_the_best_lr_and_pairs_seeds(tmp_path):
  c = lowrank_study.get_config('tiny')
  proc = _study(tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '=== probe ===' in proc.stdout
  probe = json.loads((tmp_path / 'probe' / 'config.json').read_text())
  assert probe['method'] == {'name': 'probe'} and probe['optimizer']['lr'] == c.probe.lr
  finals = {(name, lr): analysis.curve(_run(tmp_path, name, lr, 0))['val_loss'][-1]
            for name in ('lora_r', 'pissa') for lr in c.lrs}
  best = {name: min(c.lrs, key=lambda lr: finals[name, lr]) for name in ('lora_r', 'pissa')}
  r = json.loads((tmp_path / 'study.json').read_text())['pairs']['pissa']
  assert (r['baseline_lr'], r['method_lr']) == (best['lora_r'], best['pissa'])
  # Seed 1 of the baseline at its best lr, of PiSSA at its own and at the baseline's; no more.
  seeded = {('lora_r', best['lora_r']), ('pissa', best['pissa']), ('pissa', best['lora_r'])}
  assert sorted(tmp_path.glob('*/lr_*/seed_[1-9]')) == sorted(
      _run(tmp_path, name, lr, 1) for name, lr in seeded)
  for name, lr in seeded:
    config = json.loads((_run(tmp_path, name, lr, 1) / 'config.json').read_text())
    assert config['head']['init'] == str((tmp_path / 'probe' / 'adapter').absolute())
    assert config['method']['name'] == c.methods[name].name and config['seed'] == 1
  assert r['matched']['seeds'] == 2 and list(r['matched']['loss_at']) == ['3', '8']
  lora = [analysis.curve(_run(tmp_path, 'lora_r', best['lora_r'], s)) for s in (0, 1)]
  assert r['matched']['loss_at']['8']['baseline'] == [x['val_loss'][-1] for x in lora]
  assert lora[0]['steps'] == [3, 6, 8]  # every 3 steps and at the epoch's end
  # The matched comparison is `compare` of the curves, towards the study's target.
  start = analysis.curve(tmp_path / 'probe')['val_loss'][-1]
  target = start - analysis.TARGET_SHARE * (start - np.mean([x['val_loss'][-1] for x in lora]))
  pissa = [analysis.curve(_run(tmp_path, 'pissa', best['lora_r'], s)) for s in (0, 1)]
  expected = analysis.compare(pissa, lora, c.report_steps, start, target)
  assert json.dumps(r['matched']) == json.dumps(expected)  # (NaN != NaN, so compare as text)
  table = (tmp_path / 'study.md').read_text()
  assert '| lora_r |' in table and '| PiSSA vs LoRA (alpha = r) | matched lr |' in table
  assert (tmp_path / 'study.png').stat().st_size > 1000

  # A second run finds every run done and only reports.
  marker = _run(tmp_path, 'pissa', c.lrs[0], 0) / 'summary.json'
  before, report = marker.stat().st_mtime_ns, (tmp_path / 'study.json').read_text()
  again = _study(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert '===' not in again.stdout and marker.stat().st_mtime_ns == before
  assert (tmp_path / 'study.json').read_text() == report


def test_steps_to_target_interpolates_from_the_start_loss():
  c = {'steps': [10, 20, 30], 'val_loss': [0.8, 0.6, 0.5]}
  assert analysis.steps_to(c, 0.7, start_loss=1.0) == pytest.approx(15.0)
  assert analysis.steps_to(c, 0.9, start_loss=1.0) == pytest.approx(5.0)
  assert analysis.steps_to(c, 1.2, start_loss=1.0) == 0.0
  assert analysis.steps_to(c, 0.4, start_loss=1.0) == float('inf')


def test_paired_interval_and_verdicts():
  d = analysis.paired([-3.0, -1.0, -2.0, -2.0])
  half = 3.182446305284263 * np.std([-3, -1, -2, -2], ddof=1) / 2  # t(0.975, 3)
  assert d['mean'] == -2.0 and d['ci'] == pytest.approx([-2.0 - half, -2.0 + half])
  below, above, spans = {'ci': [-2, -1]}, {'ci': [1, 2]}, {'ci': [-1, 1]}
  assert analysis.verdict([below, spans]) == 'reproduced'
  assert analysis.verdict([above, spans]) == 'not reproduced'
  assert analysis.verdict([below, above]) == 'inconclusive'
  assert analysis.verdict([spans]) == 'inconclusive'
  assert analysis.verdict([{'ci': None}]) == 'inconclusive (one seed)'
  assert analysis.paired([1.0, float('inf')])['ci'] is None


def test_bad_study_configs_are_clear_errors(tmp_path):
  out = _study(tmp_path, '--config.only=pissa,pisa', timeout=300)
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert "unknown pairs ['pisa']" in out.stderr
  out = _study(tmp_path, '--config.pairs.pissa.baseline=lora_x', timeout=300)
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert "pair 'pissa': baseline 'lora_x' is not in methods" in out.stderr
  assert not (tmp_path / 'probe').exists()  # found before anything trains


def test_every_study_method_is_registered():
  from peftjax import methods
  for name, m in lowrank_study.get_config().methods.items():
    assert m.name in methods.REGISTRY, name
