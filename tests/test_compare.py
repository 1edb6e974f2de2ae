"""Runs side by side (`experiments.compare`, `configs/sparse_study.py`): one process per run
or stage, peak RSS per run, composition and grafting recovery, resuming a stopped study."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from configs import sparse_study
from experiments import compare

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_chain_runs_one_process_per_stage_cut_after_it(tmp_path):
  c = sparse_study.get_config('tiny')
  jobs = {label: (directory, job) for label, directory, job in compare.jobs(c, tmp_path)}
  assert list(jobs) == ['probe', 'lora', 'lt_sft/full', 'lt_sft/sparse', 'graft',
                        'lt_sft_amazon/full', 'lt_sft_amazon/sparse']
  directory, job = jobs['lt_sft/full']
  assert directory == tmp_path / 'lt_sft' / 'full' and job['workdir'] == str(tmp_path / 'lt_sft')
  assert job['config']['stage_order'] == ['full'] and list(job['config']['stages']) == ['full']
  assert job['merge']  # the next stage starts from its merged result
  assert not jobs['lt_sft/sparse'][1]['merge']
  assert jobs['lt_sft/sparse'][1]['config']['stage_order'] == ['full', 'sparse']
  # `{workdir}` names the study's own folder.
  graft = jobs['graft'][1]['config']
  assert graft['method']['finetuned'] == str(tmp_path.absolute() / 'lt_sft/full/adapter')
  assert graft['head']['init'] == graft['method']['finetuned']
  assert [label for label, _, _ in compare.jobs(_with(c, only='graft, probe'), tmp_path)] == [
      'probe', 'graft']


def _with(c, **changes):
  with c.unlocked():
    for key, value in changes.items():
      setattr(c, key, value)
  return c


def test_unknown_names_are_clear_errors(tmp_path):
  c = sparse_study.get_config('tiny')
  with pytest.raises(ValueError, match=r"unknown runs \['hft'\]"):
    compare.jobs(_with(c, only='hft'), tmp_path)
  rows = c.rows.to_dict()
  with pytest.raises(ValueError, match='rows name runs the study lacks'):
    compare.check_rows(_with(c, rows={**rows, 'x': 'lt_sft/phase3'}))
  c = sparse_study.get_config('tiny')
  with pytest.raises(ValueError, match=r"\['fulll'\] are not among the rows"):
    compare.check_rows(_with(c, baseline='fulll'))
  with pytest.raises(ValueError, match='unknown variant'):
    sparse_study.get_config('huge')


def test_seeds_give_means_intervals_and_paired_differences(tmp_path):
  import ml_collections
  from configs import vit_transfer
  c = vit_transfer.get_config()
  assert c.seeds['digits: ssf'] == ['digits_ssf', 'digits_ssf_seed1', 'digits_ssf_seed2']
  assert c.runs['digits_ssf_seed2'].seed == 2 and c.runs['digits_ssf'].seed == 0
  compare.check_rows(c)
  accuracy = {'a': [0.80, 0.84, 0.82], 'b': [0.70, 0.71, 0.75]}
  for label, values in accuracy.items():
    for seed, value in enumerate(values):
      (tmp_path / f'{label}{seed}').mkdir()
      (tmp_path / f'{label}{seed}' / 'summary.json').write_text(
          json.dumps({'test_accuracy': value}))
  config = ml_collections.ConfigDict({
      'seeds': {'A': ['a0', 'a1', 'a2'], 'B': ['b0', 'b1', 'b2'], 'C': ['a0', 'missing']},
      'differences': [('A', 'B'), ('A', 'C')]})
  seeds, differences = compare.seeded(config, tmp_path)
  assert seeds['A']['mean'] == pytest.approx(0.82)
  # t(0.975, 2) = 4.303; the standard deviation of 0.80, 0.84, 0.82 is 0.02.
  assert seeds['A']['ci'] == pytest.approx([0.82 - 4.303 * 0.02 / 3 ** 0.5,
                                            0.82 + 4.303 * 0.02 / 3 ** 0.5], abs=1e-4)
  assert seeds['C']['test_accuracy'] == [0.80]
  # Paired by seed: the differences 0.10, 0.13, 0.07 (not the difference of means alone).
  (d,) = differences  # A - C is left out: C has a missing run
  assert (d['first'], d['second'], d['n']) == ('A', 'B', 3)
  assert d['mean'] == pytest.approx(0.10)
  half = 4.303 * 0.03 / 3 ** 0.5
  assert d['ci'] == pytest.approx([0.10 - half, 0.10 + half], abs=1e-4)
  table = compare.markdown({'rows': {}, 'baseline': 'A', 'seeds': seeds,
                            'differences': differences})
  assert '| A | 3/3 | 0.8200 |' in table and '| A | B | 3 | +0.1000 |' in table
  with pytest.raises(ValueError, match='seeds name runs the study lacks'):
    compare.check_rows(_with(c, seeds={**c.seeds.to_dict(), 'x': ['nope']}))


@pytest.mark.extended  # 6 minutes of processes; vit_transfer's tiny suite runs compare in CI
def test_the_tiny_study_tabulates_every_row_composes_and_grafts(tmp_path):
  def study():
    return subprocess.run([sys.executable, '-m', 'experiments.run',
                           '--config=configs/sparse_study.py:tiny', f'--workdir={tmp_path}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)

  proc = study()
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads((tmp_path / 'compare.json').read_text())
  c = sparse_study.get_config('tiny')
  assert list(out['rows']) == list(c.rows)
  for label, row in out['rows'].items():
    assert row['run'] == c.rows[label] and 0.05 < row['peak_rss_gb'] < 20, (label, row)
    assert (tmp_path / row['run'] / compare.RESOURCES).exists()
  # the merged phase 1 that phase 2 selects from was written outside phase 2's process
  assert (tmp_path / 'lt_sft' / 'full' / 'model.safetensors').exists()
  assert set(out['compose']) == {'lt_sft', 'lt_sft (amazon)'}
  for label, part in out['compose'].items():
    assert part['alone'] == out['rows'][label]['test_accuracy']
    assert 0.0 <= part['composed'] <= 1.0
  rec = out['recovery']
  assert rec['full_accuracy'] == out['rows']['full']['test_accuracy']
  assert 0.0 < rec['grafted_fraction'] <= 0.02 and 0.0 < rec['base_patch_fraction'] <= 0.01
  table = (tmp_path / 'compare.md').read_text()
  assert all(f'| {label} |' in table for label in c.rows) and 'Composition' in table
  # A finished study only reports again.
  again = study()
  assert again.returncode == 0 and '===' not in again.stdout, again.stderr[-2000:]
  assert json.loads((tmp_path / 'compare.json').read_text()) == out

