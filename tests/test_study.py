"""The study driver (`configs/lowrank_study.py` through `experiments.run`) on a tiny model."""
from __future__ import annotations

import json

import ml_collections
import pytest

from configs import lowrank_study
from experiments import study
from experiments.bench import TINY_MODEL


def tiny_study(only='lora,pissa,corda_kpm'):
  c = lowrank_study.get_config()
  c.base.model = ml_collections.ConfigDict(TINY_MODEL)
  c.base.data.limit, c.base.data.max_length = 64, 16
  c.base.train.batch_size, c.base.train.eval_batch_size, c.base.train.max_steps = 8, 32, 6
  c.base.train.log_every = 3
  c.base.calibration.batches = 2
  c.runs.lora.seeds, c.runs.pissa.seeds, c.runs.corda_kpm.seeds = 2, 1, 1
  c.report_steps, c.window, c.only = (3, 6), 2, only
  return c


def test_study_trains_each_run_and_tabulates(tmp_path):
  rows = study.run_study(tiny_study(), tmp_path)
  assert list(rows) == ['lora', 'pissa', 'corda_kpm']
  assert rows['lora']['seeds'] == 2 and len(rows['lora']['test_accuracy']) == 2
  for name, row in rows.items():
    summaries = [json.loads((tmp_path / name / f'seed_{s}' / 'summary.json').read_text())
                 for s in range(row['seeds'])]
    assert all(s['steps'] == 6 for s in summaries)
    losses = [r['loss'] for r in map(json.loads, (tmp_path / name / 'seed_0' /
                                                 'metrics.jsonl').open()) if r['kind'] == 'train']
    assert row['loss_at']['6'][0] == pytest.approx(sum(losses[4:6]) / 2)
    assert len(row['mean_curve']) == 6
  # Seeds differ (head, init, data order), so their losses do.
  assert rows['lora']['loss_at']['6'][0] != rows['lora']['loss_at']['6'][1]
  table = (tmp_path / 'study.md').read_text().splitlines()
  assert table[0].startswith('| run | seeds | trainable params | test accuracy | loss @3')
  assert len(table) == 2 + 3 and table[2].startswith('| lora | 2 |')
  assert '±' in table[2] and '+0.0000' in table[2]  # LoRA against itself
  assert (tmp_path / 'loss_curves.png').stat().st_size > 1000
  assert json.loads((tmp_path / 'study.json').read_text()) == rows

  # A second call finds every run done and only re-tabulates.
  before = (tmp_path / 'pissa' / 'seed_0' / 'summary.json').stat().st_mtime_ns
  assert study.run_study(tiny_study(), tmp_path) == rows
  assert (tmp_path / 'pissa' / 'seed_0' / 'summary.json').stat().st_mtime_ns == before


def test_unknown_run_name_is_an_error(tmp_path):
  with pytest.raises(ValueError, match=r"unknown runs \['pisa'\]"):
    study.run_study(tiny_study(only='lora,pisa'), tmp_path)


def test_every_run_names_a_registered_method():
  from peftjax import methods
  for name, run in lowrank_study.get_config().runs.items():
    assert run.method.name in methods.REGISTRY, name
