"""Chained stages: each starts from the previous result, and a killed stage resumes exactly."""
import json

import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from peftjax.io.params_file import ParamsFileError, load_params, save_params
from peftjax.train.stages import run_stages
from tiny_runs import adapter_tensors, tiny, train_losses


def chain():
  pre = tiny('full', epochs=1)
  fine = tiny('lora', epochs=1)
  fine.start = 'merged'
  more = tiny('lora', epochs=1)
  more.start = 'adapter'
  more.optimizer.lr, more.optimizer.weight_decay = 0.0, 0.0  # leaves the adapter as it starts
  c = ml_collections.ConfigDict()
  c.stage_order = ('pre', 'fine', 'more')
  c.stages = ml_collections.ConfigDict({'pre': pre, 'fine': fine, 'more': more})
  return c


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('chain')
  return workdir, run_stages(chain(), workdir)


@pytest.mark.long
def test_each_stage_starts_from_the_previous_result(uninterrupted):
  workdir, results = uninterrupted
  assert list(results) == ['pre', 'fine', 'more']
  assert json.loads((workdir / 'summary.json').read_text()) == results
  merged = safetensors.numpy.load_file(str(workdir / 'pre' / 'model.safetensors'))
  full = adapter_tensors(workdir / 'pre')  # full fine-tuning saves every weight
  for path, value in merged.items():  # the pretrained stage's weights are the next base
    np.testing.assert_array_equal(value, full[f'state/{path}'])
  fine = json.loads((workdir / 'fine' / 'config.json').read_text())
  assert fine['model']['init'] == str(workdir / 'pre' / 'model.safetensors')
  more = json.loads((workdir / 'more' / 'config.json').read_text())
  assert more['model']['init'] == fine['model']['init']
  assert more['method']['init'] == str(workdir / 'fine' / 'adapter')
  a, b = adapter_tensors(workdir / 'more'), adapter_tensors(workdir / 'fine')
  states = [k for k in a if k.startswith('state/')]
  assert states and all(np.array_equal(a[k], b[k]) for k in states)


@pytest.mark.long
def test_a_killed_stage_resumes_to_the_same_result(uninterrupted, tmp_path, capsys):
  reference, results = uninterrupted
  with pytest.raises(SystemExit, match='halted at step 3'):
    run_stages(chain(), tmp_path, halt_at=('fine', 3))
  resumed = run_stages(chain(), tmp_path)
  assert 'stage pre: finished earlier, skipped' in capsys.readouterr().out
  assert train_losses(tmp_path / 'fine') == train_losses(reference / 'fine')
  for stage in ('fine', 'more'):
    a, b = adapter_tensors(tmp_path / stage), adapter_tensors(reference / stage)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert resumed[stage]['test_accuracy'] == results[stage]['test_accuracy']


def test_bad_chains_and_params_files_are_clear_errors(tmp_path):
  c = chain()
  c.stage_order = ('pre', 'fine')
  with pytest.raises(ValueError, match='must name each of the stages'):
    run_stages(c, tmp_path)
  c = chain()
  c.stages.fine.start = 'continue'
  with pytest.raises(ValueError, match="stages.fine.start is 'continue'"):
    run_stages(c, tmp_path)
  path = save_params(tmp_path / 'p.safetensors', {'a': {'kernel': np.ones((2, 3), np.float32)}})
  with pytest.raises(ParamsFileError, match=r'a/kernel: expected \(3, 3\), found \(2, 3\)'):
    load_params(path, {'a': {'kernel': np.ones((3, 3), np.float32)}})
  path.write_bytes(b'garbage')
  with pytest.raises(ParamsFileError, match='cannot read'):
    load_params(path, {'a': {'kernel': np.ones((2, 3), np.float32)}})
