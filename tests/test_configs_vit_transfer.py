"""The ViT transfer suite (`configs/vit_transfer.py`): its rows and their settings, the slots
that methods join when they are registered, and the tiny suite end to end."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from configs import vit_transfer
from experiments import compare
from peftjax import methods
from peftjax.tasks import heads

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROWS = ['full', 'linear_probe', 'attentive_probe', 'lora', 'adapter_seq', 'adapter_seq_nores',
        'adapter_par', 'adapter_par_res', 'adapter_par_1bit', 'mosa', 'ssf', 'vpt_shallow', 'vpt_deep', 'dvpt',
        'side']


def test_every_method_runs_on_both_data_sets_from_the_pretrained_vit(tmp_path):
  c = vit_transfer.get_config()
  assert list(c.rows) == [f'{d}: {r}' for d in ('mnist', 'digits') for r in ROWS]
  seeds = [f'{r}_seed{s}' for r in ('full', 'linear_probe', 'ssf') for s in (1, 2)]
  assert list(c.runs) == [f'{d}_{r}' for d in ('mnist', 'digits') for r in ROWS + seeds]
  compare.check_rows(c)
  assert len(compare.jobs(c, tmp_path)) == 2 * (len(ROWS) + len(seeds))
  for name, run in c.runs.items():
    assert run.model.checkpoint == 'fashion_mnist' and run.task == 'image_classification'
    assert run.data.name == name.split('_')[0] and run.data.limit == 0
  assert c.runs.mnist_full.method.name == 'full' and c.runs.mnist_full.train.epochs == 3
  assert c.runs.digits_full.train.epochs == 6
  assert heads.spec(c.runs.mnist_attentive_probe) == heads.HeadSpec('attentive', 8, 1)
  assert c.runs.mnist_attentive_probe.method.name == 'probe'
  assert heads.spec(c.runs.mnist_linear_probe).kind == 'linear'
  # the new head learns at the linear probe's rate in every row but the attentive probe
  for name, run in c.runs.items():
    head_lr = run.optimizer.lr * run.optimizer.head_lr_scale
    assert head_lr == pytest.approx(run.optimizer.lr if 'attentive' in name else 5e-2), name
  placements = {(r.method.placement, r.method.residual) for n, r in c.runs.items()
                if n.startswith('mnist_adapter') and r.method.name == 'adapter'}
  assert c.runs.mnist_adapter_par_1bit.method.adapter.placement == 'parallel'
  assert placements == {('sequential', True), ('sequential', False), ('parallel', True),
                        ('parallel', False)}
  # each row's method builds (its keys are the method's arguments)
  for row in ROWS:
    method = c.runs[f'mnist_{row}'].method.to_dict()
    methods.from_config({'method': method.pop('name'), **method})


def test_every_rows_method_finds_its_targets_in_the_vit():
  import jax  # pylint: disable=g-import-not-at-top
  from peftjax import models  # pylint: disable=g-import-not-at-top
  from peftjax.models import TINY_VIT  # pylint: disable=g-import-not-at-top
  params = models.build(ml_collections.ConfigDict({**TINY_VIT, 'remat': False, 'init': ''})).params
  c = vit_transfer.get_config()
  for row in vit_transfer.rows():
    method = c.runs[f'mnist_{row}'].method.to_dict()
    adapter = methods.from_config({'method': method.pop('name'), **method})
    adapter.init(jax.random.key(0), params)  # a pattern that matches nothing raises


def test_unknown_variant_is_a_clear_error():
  with pytest.raises(ValueError, match=r"unknown variant 'huge' after the config file's ':'; "
                     r"expected one of \('', 'tiny'\)"):
    vit_transfer.get_config('huge')


@pytest.mark.long
def test_the_tiny_suite_tabulates_every_row(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'experiments.run',
                         '--config=configs/vit_transfer.py:tiny', f'--workdir={tmp_path}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads((tmp_path / 'compare.json').read_text())
  c = vit_transfer.get_config('tiny')
  assert list(out['rows']) == list(c.rows)
  trainable = {label: row['trainable_params'] for label, row in out['rows'].items()}
  # TINY_VIT is 16 wide; 10 classes
  assert trainable['digits: linear_probe'] == 16 * 10 + 10
  assert trainable['digits: attentive_probe'] == heads.attentive_params(16, 10, 8, 1)
  assert trainable['mnist: full'] == out['rows']['mnist: full']['model_params'] + 170
  table = (tmp_path / 'compare.md').read_text()
  assert all(f'| {label} |' in table for label in c.rows)
