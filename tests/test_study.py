"""The paired study driver (`configs/lowrank_study.py` through `experiments.run`), tiny."""
from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from configs import lowrank_study
from experiments import study
from experiments.bench import TINY_MODEL


def tiny_study(only='pissa'):
  c = lowrank_study.get_config()
  c.base.model = ml_collections.ConfigDict(TINY_MODEL)
  c.base.data.limit, c.base.data.max_length = 64, 16
  c.base.train.batch_size, c.base.train.eval_batch_size = 8, 32
  c.base.train.eval_every, c.base.train.log_every, c.base.train.checkpoint_every = 3, 3, 0
  c.base.optimizer.warmup_steps = 1
  c.lrs = (1e-3, 3e-2)
  c.pairs.pissa.seeds, c.matched_seeds = 2, 2
  c.report_steps, c.only = (3, 8), only
  return c


def test_study_sweeps_picks_the_best_lr_and_pairs_seeds(tmp_path):
  c = tiny_study()
  out = study.run_study(c, tmp_path)
  probe = json.loads((tmp_path / 'probe' / 'config.json').read_text())
  assert probe['method'] == {'name': 'probe'} and probe['optimizer']['lr'] == c.probe.lr
  finals = {(name, lr): study.curve(study.run_dir(tmp_path, name, lr, 0))['val_loss'][-1]
            for name in ('lora_r', 'pissa') for lr in c.lrs}
  best = {name: min(c.lrs, key=lambda lr: finals[name, lr]) for name in ('lora_r', 'pissa')}
  r = out['pairs']['pissa']
  assert (r['baseline_lr'], r['method_lr']) == (best['lora_r'], best['pissa'])
  for name, lr, seeds in study.plan(c, tmp_path, c.pairs.pissa):
    assert seeds == 2
    run = study.run_dir(tmp_path, name, lr, 1)
    config = json.loads((run / 'config.json').read_text())
    assert config['head']['init'] == str((tmp_path / 'probe' / 'adapter').absolute())
    assert config['method']['name'] == c.methods[name].name and config['seed'] == 1
  assert r['matched']['seeds'] == 2 and list(r['matched']['loss_at']) == ['3', '8']
  lora = [study.curve(study.run_dir(tmp_path, 'lora_r', best['lora_r'], s)) for s in (0, 1)]
  assert r['matched']['loss_at']['8']['baseline'] == [x['val_loss'][-1] for x in lora]
  assert lora[0]['steps'] == [3, 6, 8]  # every 3 steps and at the epoch's end
  table = (tmp_path / 'study.md').read_text()
  assert '| lora_r |' in table and '| PiSSA vs LoRA (alpha = r) | matched lr |' in table
  assert (tmp_path / 'study.png').stat().st_size > 1000
  assert json.loads((tmp_path / 'study.json').read_text())['pairs']['pissa']['baseline_lr'] \
      == best['lora_r']

  # A second call finds every run done and only reports.
  marker = study.run_dir(tmp_path, 'pissa', c.lrs[0], 0) / 'summary.json'
  before = marker.stat().st_mtime_ns
  again = study.run_study(c, tmp_path)['pairs']['pissa']['matched']
  assert json.dumps(again) == json.dumps(r['matched'])  # (NaN != NaN, so compare as text)
  assert marker.stat().st_mtime_ns == before


def test_steps_to_target_interpolates_from_the_start_loss():
  c = {'steps': [10, 20, 30], 'val_loss': [0.8, 0.6, 0.5]}
  assert study.steps_to(c, 0.7, start_loss=1.0) == pytest.approx(15.0)
  assert study.steps_to(c, 0.9, start_loss=1.0) == pytest.approx(5.0)
  assert study.steps_to(c, 1.2, start_loss=1.0) == 0.0
  assert study.steps_to(c, 0.4, start_loss=1.0) == float('inf')


def test_paired_interval_and_verdicts():
  d = study.paired([-3.0, -1.0, -2.0, -2.0])
  half = 3.182446305284263 * np.std([-3, -1, -2, -2], ddof=1) / 2  # t(0.975, 3)
  assert d['mean'] == -2.0 and d['ci'] == pytest.approx([-2.0 - half, -2.0 + half])
  below, above, spans = {'ci': [-2, -1]}, {'ci': [1, 2]}, {'ci': [-1, 1]}
  assert study.verdict([below, spans]) == 'reproduced'
  assert study.verdict([above, spans]) == 'not reproduced'
  assert study.verdict([below, above]) == 'inconclusive'
  assert study.verdict([spans]) == 'inconclusive'
  assert study.verdict([{'ci': None}]) == 'inconclusive (one seed)'
  assert study.paired([1.0, float('inf')])['ci'] is None


def test_bad_study_configs_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match=r"unknown pairs \['pisa'\]"):
    study.run_study(tiny_study(only='pissa,pisa'), tmp_path)
  c = tiny_study()
  c.pairs.pissa.baseline = 'lora_x'
  with pytest.raises(ValueError, match="pair 'pissa': baseline 'lora_x' is not in methods"):
    study.run_study(c, tmp_path)


def test_every_study_method_is_registered():
  from peftjax import methods
  for name, m in lowrank_study.get_config().methods.items():
    assert m.name in methods.REGISTRY, name
