"""The trainer on meshes of 8 fake CPU devices and in 2 processes; crash, resharding and
NaN behaviour. Every layout must reproduce the 1-device loss trajectory (the sums are the
same up to float32 reassociation: differences seen are ~1e-7, the tolerance is 1e-5)."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.tasks import classification
from peftjax.train.checkpoint import Checkpointer
from peftjax.train.loop import train
from tiny_runs import adapter_tensors, tiny, train_losses

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOL = 1e-5
ONE_DEVICE = {'data': 1}


def losses(workdir):
  return np.array([l for _, l in train_losses(workdir)])


def val_records(workdir):
  return [r for r in map(json.loads, (workdir / 'metrics.jsonl').open()) if r['kind'] == 'val']


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """Two epochs (10 steps) on one device."""
  workdir = tmp_path_factory.mktemp('reference')
  return workdir, train(tiny(mesh=ONE_DEVICE), workdir)


@pytest.mark.parametrize('mesh', [
    pytest.param({'data': 8}, id='data8'),
    pytest.param({'data': 1, 'fsdp': 8}, id='fsdp8', marks=pytest.mark.long),
    pytest.param({'data': 2, 'tensor': 4}, id='data2-tensor4', marks=pytest.mark.long),
    pytest.param({'data': 2, 'fsdp': 2, 'tensor': 2}, id='data2-fsdp2-tensor2')])
def test_every_layout_gives_the_one_device_losses(reference, tmp_path, mesh):
  summary = train(tiny(mesh=mesh, epochs=1), tmp_path)
  assert summary['devices'] == 8 and summary['mesh'] == {'fsdp': 1, 'tensor': 1, **mesh}
  np.testing.assert_allclose(losses(tmp_path), losses(reference[0])[:5], atol=TOL, rtol=0)
  assert val_records(tmp_path)[0]['accuracy'] == val_records(reference[0])[0]['accuracy']
  np.testing.assert_allclose(val_records(tmp_path)[0]['loss'],
                             val_records(reference[0])[0]['loss'], atol=TOL)


@pytest.mark.long
def test_remat_changes_nothing_but_memory(reference, tmp_path):
  config = tiny(mesh={'fsdp': 2, 'data': 4}, epochs=1)
  config.model.remat = True
  train(config, tmp_path)
  np.testing.assert_allclose(losses(tmp_path), losses(reference[0])[:5], atol=TOL, rtol=0)


def _no_dropout(config):
  config.model.hidden_dropout = config.model.attention_dropout = 0.0
  config.method.dropout = 0.0
  return config


@pytest.mark.long
def test_gradient_accumulation_equals_the_full_batch(tmp_path):
  whole = train(_no_dropout(tiny(epochs=1)), tmp_path / 'whole')
  split = train(_no_dropout(tiny(epochs=1, accumulate=2)), tmp_path / 'split')
  np.testing.assert_allclose(losses(tmp_path / 'split'), losses(tmp_path / 'whole'),
                             atol=TOL, rtol=0)
  assert split['val_accuracy'] == whole['val_accuracy']
  with pytest.raises(ValueError, match=r'multiple of the mesh\'s batch shards \(data x fsdp '
                                       r'= 8\) times train.accumulate \(4\)'):
    train(tiny(epochs=1, accumulate=4), tmp_path / 'bad')


@pytest.mark.long
def test_bf16_compute_keeps_float32_master_weights(reference, tmp_path):
  summary = train(tiny(mesh={'data': 4, 'tensor': 2}, epochs=1, compute_dtype='bfloat16'),
                  tmp_path)
  assert summary['compute_dtype'] == 'bfloat16'
  got, want = losses(tmp_path), losses(reference[0])[:5]
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, atol=0.02)  # bf16 has 8 bits of mantissa
  assert not np.allclose(got, want, atol=1e-6, rtol=0)  # it did compute in bf16
  assert {t.dtype for t in adapter_tensors(tmp_path).values()} == {np.dtype(np.float32)}


@pytest.mark.long
def test_checkpoint_restores_onto_a_different_mesh(reference, tmp_path):
  with pytest.raises(SystemExit, match='halted at step 7'):
    train(tiny(mesh=ONE_DEVICE), tmp_path, halt_at_step=7)
  resumed = train(tiny(mesh={'data': 2, 'fsdp': 2, 'tensor': 2}), tmp_path, resume=True)
  assert resumed['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert [s for s, _ in train_losses(tmp_path)] == list(range(1, 11))
  np.testing.assert_allclose(losses(tmp_path), losses(reference[0]), atol=TOL, rtol=0)
  assert resumed['val_accuracy'] == reference[1]['val_accuracy']


def _launch(workdir, overrides, env=None, resume=False):
  cmd = [sys.executable, str(ROOT / 'tests' / 'tiny_runs.py'), str(workdir),
         json.dumps(overrides)] + (['--resume'] if resume else [])
  path = os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])
  return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, 'PYTHONPATH': path, **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.long
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(reference, tmp_path):
  overrides = {'mesh': ONE_DEVICE, 'train': {'checkpoint_every': 1}}
  proc = _launch(tmp_path, overrides)
  ckpts = tmp_path / 'checkpoints'
  deadline = time.time() + 300
  while not (ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 3
                                    for p in ckpts.iterdir())):
    assert proc.poll() is None, f'run ended before it could be killed:\n{proc.stdout.read()}'
    assert time.time() < deadline, 'no checkpoint after 300 s'
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  killed_at = Checkpointer(ckpts).latest_step()
  assert 3 <= killed_at < 10
  resumed = train(tiny(mesh=ONE_DEVICE, checkpoint_every=1), tmp_path, resume=True)
  assert train_losses(tmp_path) == train_losses(reference[0])  # bit for bit
  for key in ('test_accuracy', 'val_accuracy', 'best_epoch', 'steps'):
    assert resumed[key] == reference[1][key]
  a, b = adapter_tensors(tmp_path), adapter_tensors(reference[0])
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _two_processes(workdir, overrides, resume=False):
  port = _free_port()
  procs = [_launch(workdir, overrides, resume=resume, env={
      'JAX_COORDINATOR_ADDRESS': f'localhost:{port}', 'JAX_NUM_PROCESSES': '2',
      'JAX_PROCESS_ID': str(i), 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
           for i in range(2)]
  return procs, [p.communicate(timeout=600)[0] for p in procs]


@pytest.mark.long
def test_one_config_on_1_device_8_devices_and_2_processes_gives_equal_losses(tmp_path):
  """The unchanged config (mesh.data = -1: every device there is) in three set-ups."""
  eight = train(tiny(epochs=1), tmp_path / 'eight')  # this process: 8 devices
  one = _launch(tmp_path / 'one', {'train': {'epochs': 1}},
                env={'XLA_FLAGS': '--xla_force_host_platform_device_count=1'})
  procs, outputs = _two_processes(tmp_path / 'two', {'train': {'epochs': 1}})
  outputs = [one.communicate(timeout=600)[0], *outputs]
  assert [p.returncode for p in [one, *procs]] == [0, 0, 0], outputs
  summaries = {name: json.loads((tmp_path / name / 'summary.json').read_text())
               for name in ('one', 'two')} | {'eight': eight}
  assert {k: (s['devices'], s['processes']) for k, s in summaries.items()} == {
      'one': (1, 1), 'eight': (8, 1), 'two': (4, 2)}
  assert [s for s, _ in train_losses(tmp_path / 'two')] == [1, 2, 3, 4, 5]  # process 0 only
  assert 'test accuracy' in outputs[1] and 'test accuracy' not in outputs[2]
  for name in ('one', 'two'):
    np.testing.assert_allclose(losses(tmp_path / name), losses(tmp_path / 'eight'),
                               atol=TOL, rtol=0)
    assert summaries[name]['test_accuracy'] == eight['test_accuracy']


@pytest.mark.long
def test_two_processes_resume_from_their_checkpoint(reference, tmp_path):
  procs, outputs = _two_processes(tmp_path, {'halt_at_step': 7})
  assert all('halted at step 7' in out for out in outputs), outputs
  procs, outputs = _two_processes(tmp_path, {}, resume=True)
  assert [p.returncode for p in procs] == [0, 0], outputs
  assert 'resumed at step 6' in outputs[0]
  assert [s for s, _ in train_losses(tmp_path)] == list(range(1, 11))
  np.testing.assert_allclose(losses(tmp_path), losses(reference[0]), atol=TOL, rtol=0)
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['test_accuracy'] == reference[1]['test_accuracy']


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  """72 rows: batch 5 is the first with padding rows, where this loss turns NaN."""
  original = classification.cross_entropy

  def poisoned(logits, labels, weights):
    return jnp.where(jnp.sum(weights) < weights.size, jnp.nan,
                     original(logits, labels, weights))

  monkeypatch.setattr(classification, 'cross_entropy', poisoned)
  config = tiny(mesh=ONE_DEVICE, log_every=10)
  config.data.limit = 72
  with pytest.raises(FloatingPointError, match=r'training loss is nan at step 5; stopped '
                                               r'without saving\. The last good checkpoint '
                                               r'\(step 4\) is kept'):
    train(config, tmp_path)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['2', '4']
  assert Checkpointer(tmp_path / 'checkpoints').latest_step() == 4
  assert not (tmp_path / 'adapter').exists()
