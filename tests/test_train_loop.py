"""The trainer end to end on a tiny random BERT and a slice of the real VADER data."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from peftjax.io.adapter_file import AdapterFileError
from peftjax.train.checkpoint import CheckpointError
from peftjax.train.loop import evaluate_adapter, train
from tiny_runs import adapter_tensors, tiny, train_losses


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('full_run')
  return workdir, train(tiny(), workdir)


def test_run_writes_summary_adapter_metrics_and_plot(uninterrupted):
  workdir, summary = uninterrupted
  on_disk = json.loads((workdir / 'summary.json').read_text())
  assert on_disk == summary
  for key in ('test_accuracy', 'val_accuracy', 'trainable_params', 'total_params',
              'train_steps_per_sec', 'epochs', 'adapter_path', 'adapter_bytes'):
    assert on_disk[key] is not None, key
  assert 0.0 <= summary['test_accuracy'] <= 1.0
  assert summary['steps'] == 2 * 5  # 80 rows / batch 16, two epochs
  assert summary['adapter_bytes'] == (workdir / 'adapter' / 'adapter.safetensors').stat().st_size
  assert (workdir / 'curves.png').stat().st_size > 1000
  steps = [s for s, _ in train_losses(workdir)]
  assert steps == list(range(1, 11))
  val = [json.loads(l) for l in (workdir / 'metrics.jsonl').open() if '"val"' in l]
  assert [r['epoch'] for r in val] == [1, 2]
  assert max(r['accuracy'] for r in val) == summary['val_accuracy']


def test_adapter_file_holds_lora_and_head_only(uninterrupted):
  workdir, summary = uninterrupted
  tensors = adapter_tensors(workdir)
  assert all(k.startswith(('state/', 'head/')) for k in tensors)
  assert sum(v.size for v in tensors.values()) == summary['trainable_params']


def test_resume_continues_bit_exactly(uninterrupted, tmp_path):
  reference, summary = uninterrupted
  with pytest.raises(SystemExit, match='halted at step 7'):
    train(tiny(), tmp_path, halt_at_step=7)  # dies after the step-6 checkpoint
  resumed = train(tiny(), tmp_path, resume=True)
  assert train_losses(tmp_path) == train_losses(reference)
  for key in ('test_accuracy', 'val_accuracy', 'best_epoch', 'steps'):
    assert resumed[key] == summary[key]
  a, b = adapter_tensors(tmp_path), adapter_tensors(reference)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.long
def test_resume_across_an_epoch_boundary(uninterrupted, tmp_path):
  reference, _ = uninterrupted
  with pytest.raises(SystemExit):
    train(tiny(checkpoint_every=0), tmp_path, halt_at_step=6)  # only the epoch-1 checkpoint
  train(tiny(), tmp_path, resume=True)
  assert train_losses(tmp_path) == train_losses(reference)


def test_existing_run_needs_resume_and_the_same_config(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  with pytest.raises(FileExistsError, match='--resume'):
    train(tiny(), workdir)
  changed = tiny()
  changed.optimizer.lr = 0.5
  with pytest.raises(ValueError, match='optimizer.lr'):
    train(changed, workdir, resume=True)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit):
    train(tiny(), tmp_path, halt_at_step=3)
  for f in (tmp_path / 'checkpoints' / '2').rglob('*'):
    if f.is_file() and f.name == 'manifest.ocdbt':
      f.write_bytes(b'garbage')
  with pytest.raises(CheckpointError, match='step 2'):
    train(tiny(), tmp_path, resume=True)


def test_max_steps_on_a_checkpoint_and_eval_step_mid_epoch(tmp_path):
  summary = train(tiny(max_steps=4, eval_every=2), tmp_path)  # 5 steps per epoch
  assert summary['steps'] == 4
  val = [r['step'] for r in map(json.loads, (tmp_path / 'metrics.jsonl').open())
         if r['kind'] == 'val']
  assert val == [2, 4]  # step 4 is evaluated (and checkpointed) once, at the end
  train(tiny(max_steps=4, eval_every=2), tmp_path, resume=True)  # a finished run resumes


def test_probe_trains_only_the_head(tmp_path):
  summary = train(tiny('probe', epochs=1), tmp_path)
  assert summary['trainable_params'] == 32 * 2 + 2


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.run', *args],
                        capture_output=True, text=True, timeout=120,
                        cwd=pathlib.Path(__file__).parents[1])


def test_cli_unknown_config_key_is_one_line_error(tmp_path):
  out = _cli('--config=configs/minilm_vader_lora.py', f'--workdir={tmp_path}',
             '--config.method.rnk=4')
  assert out.returncode != 0
  assert 'rnk' in out.stderr and 'Traceback' not in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


def test_cli_user_mistakes_are_one_line_errors(tmp_path):
  out = _cli('--config=configs/minilm_vader.py:no_such_method', f'--workdir={tmp_path}')
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert 'no_such_method' in out.stderr and 'pissa' in out.stderr  # it lists the known ones
  out = _cli('--config=configs/minilm_vader_lora.py', f'--workdir={tmp_path}',
             '--config.method.targets=no_such_layer', '--config.data.limit=16')
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1 and 'no_such_layer' in out.stderr
  out = _cli('--config=configs/minilm_vader_lora.py', f'--workdir={tmp_path}',
             '--config.method.targets=no_such_layer', '--config.data.limit=16', '--traceback')
  assert 'Traceback' in out.stderr


def test_evaluate_a_saved_adapter_on_other_splits_and_domains(uninterrupted, tmp_path):
  workdir, summary = uninterrupted
  out = subprocess.run([sys.executable, '-m', 'experiments.evaluate', f'--workdir={workdir}',
                        '--splits=test,val', f'--output={tmp_path / "movie.json"}'],
                       capture_output=True, text=True, timeout=300,
                       cwd=pathlib.Path(__file__).parents[1])
  assert out.returncode == 0, out.stderr[-2000:]
  saved = json.loads((tmp_path / 'movie.json').read_text())
  assert saved['data']['domain'] == 'movie' and 'movie test: loss' in out.stdout
  assert saved['metrics']['test'] == {'loss': summary['test_loss'],
                                      'accuracy': summary['test_accuracy']}
  assert saved['metrics']['val']['accuracy'] == summary['val_accuracy']  # the best epoch's
  config = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text()))
  config.data.domain = 'tweets'
  tweets = evaluate_adapter(config, workdir / 'adapter', ('test',))['test']
  assert tweets.keys() == {'loss', 'accuracy'} and tweets != saved['metrics']['test']


def test_cli_missing_config_file_is_one_line_error(tmp_path):
  out = _cli('--config=configs/no_such_config.py', f'--workdir={tmp_path}')
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert 'no_such_config.py' in out.stderr


def test_max_steps_ends_training_early_with_an_evaluation(tmp_path):
  summary = train(tiny(max_steps=7), tmp_path)
  assert summary['steps'] == 7
  assert [s for s, _ in train_losses(tmp_path)] == list(range(1, 8))
  val = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').open() if '"val"' in l]
  assert [(r['epoch'], r['step']) for r in val] == [(1, 5), (2, 7)]  # 5 steps per epoch


@pytest.mark.long
def test_eval_every_and_a_head_trained_first(tmp_path):
  """`head.init` starts from a probe run's head (with lr 0 it is kept exactly), and
  `train.eval_every` adds val evaluations between the epoch ends."""
  train(tiny('probe', epochs=1), tmp_path / 'probe')
  probe_head = {k: v for k, v in adapter_tensors(tmp_path / 'probe').items()
                if k.startswith('head/')}
  c = tiny(eval_every=2, epochs=1)
  c.head.init = str(tmp_path / 'probe' / 'adapter')
  c.optimizer.lr = 0.0
  train(c, tmp_path / 'lora')
  for k, v in probe_head.items():
    np.testing.assert_array_equal(adapter_tensors(tmp_path / 'lora')[k], v)
  val = [json.loads(l) for l in (tmp_path / 'lora' / 'metrics.jsonl').open() if '"val"' in l]
  assert [r['step'] for r in val] == [2, 4, 5] and val[0]['epoch'] == pytest.approx(0.4)
  probe_val = [json.loads(l) for l in (tmp_path / 'probe' / 'metrics.jsonl').open()
               if '"val"' in l]
  assert val[-1]['loss'] == pytest.approx(probe_val[-1]['loss'], abs=1e-6)  # same function
  c.head.init = str(tmp_path / 'nothing')
  with pytest.raises(AdapterFileError, match='no adapter at'):
    train(c, tmp_path / 'missing')


def test_head_lr_scale_scales_the_head_updates_only():
  import jax
  import jax.numpy as jnp
  import peftjax as pj
  from peftjax.train.step import make_optimizer
  rng = np.random.default_rng(0)
  params = {'adapter': {'w': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
            'head': {'kernel': jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)

  def updates(scale):
    c = ml_collections.ConfigDict({'lr': 0.1, 'weight_decay': 0.01, 'b1': 0.9, 'b2': 0.999,
                                   'eps': 1e-8, 'schedule': 'constant', 'warmup_steps': 0,
                                   'clip_norm': 0.0, 'head_lr_scale': scale})
    tx = make_optimizer(c, pj.full())
    return tx.update(grads, tx.init(params), params)[0]

  one, half, frozen = updates(1.0), updates(0.5), updates(0.0)
  np.testing.assert_array_equal(half['adapter']['w'], one['adapter']['w'])
  np.testing.assert_array_equal(half['head']['kernel'], 0.5 * one['head']['kernel'])
  np.testing.assert_array_equal(frozen['head']['kernel'], 0.0)
  assert np.abs(one['head']['kernel']).min() > 0
  with pytest.raises(ValueError, match='head_lr_scale must be >= 0'):
    updates(-1.0)


def test_sgd_is_plain_gradient_descent_with_decoupled_weight_decay():
  import jax
  import jax.numpy as jnp
  import peftjax as pj
  from peftjax.train.step import make_optimizer
  rng = np.random.default_rng(0)
  params = {'adapter': {'w': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
            'head': {'kernel': jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  c = ml_collections.ConfigDict({'name': 'sgd', 'lr': 0.1, 'weight_decay': 0.01, 'b1': 0.9,
                                 'b2': 0.999, 'eps': 1e-8, 'schedule': 'constant',
                                 'warmup_steps': 0, 'clip_norm': 0.0, 'head_lr_scale': 0.5})
  tx = make_optimizer(c, pj.full())
  updates = tx.update(grads, tx.init(params), params)[0]
  np.testing.assert_allclose(updates['adapter']['w'],
                             -0.1 * (grads['adapter']['w'] + 0.01 * params['adapter']['w']),
                             rtol=1e-6)
  np.testing.assert_allclose(updates['head']['kernel'], -0.05 * (
      grads['head']['kernel'] + 0.01 * params['head']['kernel']), rtol=1e-6)
  with pytest.raises(ValueError, match=r"optimizer.name 'adam'; expected one of \('adamw', 'sgd'\)"):
    make_optimizer(ml_collections.ConfigDict({**c.to_dict(), 'name': 'adam'}), pj.full())
