"""Calibration statistics on a plain Flax MLP and a tiny BERT, checked against by-hand values."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.core import calib as C
from peftjax.core import paths as P
from peftjax.core.paths import PatternError
from peftjax.models.bert import Bert, BertConfig, mean_pool

CFG = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                 intermediate_size=64)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(6, name='proj')(x)


class MLP(nn.Module):
  """Plain Linen layers: a nested block and a module called twice (shared weights)."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16, name='fc1')(x))
    shared = nn.Dense(16, name='shared')
    h = shared(jnp.tanh(shared(h)))
    return Block(name='block_0')(h)


def mlp_inputs(params, x):
  """By hand: the rows fed to each kernel of `MLP`."""
  p = jax.tree.map(np.asarray, params)
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  dense = lambda name, v: v @ p[name]['kernel'] + p[name]['bias']
  h1 = np.maximum(dense('fc1', x), 0)
  h2 = np.tanh(dense('shared', h1))
  return {'fc1/kernel': x, 'shared/kernel': np.concatenate([h1, h2]),
          'block_0/proj/kernel': dense('shared', h2)}


@functools.lru_cache(maxsize=None)
def mlp_setup(seed, n_batches=3):
  keys = jax.random.split(jax.random.key(seed), n_batches + 1)
  batches = [{'x': jax.random.normal(k, (4, 5, 12)),
              'mask': (jax.random.uniform(k, (4, 5)) > 0.3).astype(jnp.int32)} for k in keys[1:]]
  params = MLP().init(keys[0], batches[0]['x'])['params']
  return params, batches


def mlp_calibration(params, batches, **kwargs):
  return C.Calibration(lambda p, b: MLP().apply({'params': p}, b['x']), params, batches,
                       **kwargs)


@pytest.mark.parametrize('seed,masked', [(0, False), (1, True)])
def test_covariance_is_xtx_over_n_for_any_linen_model(seed, masked):
  params, batches = mlp_setup(seed)
  cal = mlp_calibration(params, batches, mask_fn=(lambda b: b['mask']) if masked else None)
  by_hand = {}
  for b in batches:
    m = np.asarray(b['mask']).reshape(-1).astype(bool) if masked else None
    for path, x in mlp_inputs(params, b['x']).items():
      if m is not None:
        x = x[np.concatenate([m] * (len(x) // len(m)))]
      by_hand.setdefault(path, []).append(x)
  paths = ['fc1/kernel', 'shared/kernel', 'block_0/proj/kernel']
  got = dict(cal.iter_covariances(paths))
  assert list(got) == paths
  for path in paths:
    x = np.concatenate(by_hand[path])
    np.testing.assert_allclose(got[path], x.T @ x / len(x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cal.covariance('fc1/kernel'), got['fc1/kernel'], rtol=1e-6)


def test_one_target_at_a_time_gives_the_same_statistics():
  params, batches = mlp_setup(2)
  paths = ['fc1/kernel', 'shared/kernel', 'block_0/proj/kernel']
  wide = mlp_calibration(params, batches)
  narrow = mlp_calibration(params, batches, max_bytes=0)
  assert len(wide._groups(paths, lambda s: 4 * s[0] ** 2)) == 1
  assert len(narrow._groups(paths, lambda s: 4 * s[0] ** 2)) == 3
  for (pa, a), (pb, b) in zip(wide.iter_covariances(paths), narrow.iter_covariances(paths)):
    assert pa == pb
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_activations_are_the_unmasked_input_rows_capped_and_spread():
  params, batches = mlp_setup(3)
  cal = mlp_calibration(params, batches, mask_fn=lambda b: b['mask'])
  x = cal.activations('fc1/kernel')
  rows = [mlp_inputs(params, b['x'])['fc1/kernel'][np.asarray(b['mask']).reshape(-1) > 0]
          for b in batches]
  np.testing.assert_allclose(x, np.concatenate(rows), rtol=1e-6)
  capped = cal.activations('fc1/kernel', max_rows=9)
  assert capped.shape == (9, 12)
  for b, r in enumerate(rows):  # 3 rows from each batch, first and last included
    np.testing.assert_allclose(capped[3 * b], r[0], rtol=1e-6)
    np.testing.assert_allclose(capped[3 * b + 2], r[-1], rtol=1e-6)


def loss(params, batch):
  return jnp.mean(MLP().apply({'params': params}, batch['x']) ** 2)


def test_gradient_is_jax_grad_of_the_loss_averaged_over_batches():
  params, batches = mlp_setup(4)
  cal = mlp_calibration(params, batches, loss_fn=loss)
  full = [P.flatten(jax.grad(loss)(params, b)) for b in batches]
  for path in ('shared/kernel', 'block_0/proj/kernel'):
    want = np.mean([g[path] for g in full], axis=0)
    np.testing.assert_allclose(cal.gradient(path), want, rtol=1e-5, atol=1e-7)


def test_building_is_lazy_and_errors_are_clear():
  params, batches = mlp_setup(5)
  calls = {'batches': 0, 'apply': 0}

  def source():
    calls['batches'] += 1
    return iter(batches)

  def apply_fn(p, b):
    calls['apply'] += 1
    return MLP().apply({'params': p}, b['x'])

  cal = C.Calibration(apply_fn, params, source)
  assert calls == {'batches': 0, 'apply': 0}
  cal.covariance('fc1/kernel')
  assert calls['batches'] == 1 and calls['apply'] >= 1
  cal.covariance('shared/kernel')
  assert calls['batches'] == 1  # the batches are read once
  with pytest.raises(PatternError, match='fc1/kernel'):
    cal.covariance('fc9/kernel')
  with pytest.raises(ValueError, match='loss_fn'):
    cal.gradient('fc1/kernel')
  with pytest.raises(ValueError, match='at least one batch'):
    C.Calibration(apply_fn, params, []).covariance('fc1/kernel')
  with pytest.raises(ValueError, match='must not be jax.jit-ed'):
    C.Calibration(jax.jit(apply_fn), params, batches).covariance('fc1/kernel')
  with pytest.raises(ValueError, match='mask_fn gives'):
    mlp_calibration(params, batches, mask_fn=lambda b: b['mask'][:, :2]).covariance('fc1/kernel')


# ------------------------------------------------------------------------------ tiny BERT
@functools.lru_cache(maxsize=None)
def bert_setup(seed):
  keys = jax.random.split(jax.random.key(seed), 7)
  batches = []
  for k_ids, k_len in zip(keys[1:4], keys[4:]):
    ids = jax.random.randint(k_ids, (3, 7), 1, CFG.vocab_size)
    mask = (jnp.arange(7)[None] < jax.random.randint(k_len, (3, 1), 2, 8)).astype(jnp.int32)
    batches.append({'input_ids': ids, 'attention_mask': mask})
  params = Bert(CFG).init(keys[0], batches[0]['input_ids'], batches[0]['attention_mask'])
  return params['params'], batches


def bert_apply(params, batch):
  return Bert(CFG).apply({'params': params}, batch['input_ids'], batch['attention_mask'])


def bert_loss(params, batch):
  return jnp.sum(mean_pool(bert_apply(params, batch), batch['attention_mask']) ** 2)


def test_bert_covariances_match_captured_inputs_and_gradients_match_jax_grad():
  params, batches = bert_setup(0)
  cal = C.Calibration(bert_apply, params, batches, loss_fn=bert_loss,
                      mask_fn=lambda b: b['attention_mask'])
  rows = {'encoder/layer_0/attention/query/kernel': [],
          'encoder/layer_1/attention/value/kernel': []}
  intermediates = jax.jit(lambda p, b: Bert(CFG).apply(
      {'params': p}, b['input_ids'], b['attention_mask'], capture_intermediates=True,
      mutable=['intermediates'])[1])
  for b in batches:
    inter = intermediates(params, b)
    m = np.asarray(b['attention_mask']).reshape(-1) > 0
    emb = np.asarray(inter['intermediates']['embeddings']['__call__'][0]).reshape(-1, 32)
    out0 = np.asarray(inter['intermediates']['encoder']['layer_0']['__call__'][0])
    rows['encoder/layer_0/attention/query/kernel'].append(emb[m])
    rows['encoder/layer_1/attention/value/kernel'].append(out0.reshape(-1, 32)[m])
  for path, cov in cal.iter_covariances(list(rows)):
    x = np.concatenate(rows[path]).astype(np.float64)
    np.testing.assert_allclose(cov, x.T @ x / len(x), rtol=1e-4, atol=1e-6)
  path = 'encoder/layer_1/intermediate/kernel'
  grad = jax.jit(jax.grad(bert_loss))
  want = np.mean([P.flatten(grad(params, b))[path] for b in batches], axis=0)
  np.testing.assert_allclose(cal.gradient(path), want, rtol=1e-4, atol=1e-7)


def test_restored_finds_state_leaves_plain_and_inside_a_chain():
  a = np.ones((3, 2))
  plain = C.Restored({'x/kernel/a': a}, {'x/kernel/a': a, 'x/kernel/b': a.T})
  assert plain.state_leaf('x/kernel', 'a') is a and plain.state_leaf('y/kernel', 'a') is None
  assert plain.factors('x/kernel')[1].shape == (2, 3) and plain.factors('y/kernel') is None
  assert C.Restored({'1/x/kernel/a': a}).state_leaf('x/kernel', 'a') is a
  with pytest.raises(ValueError, match='calib=Calibration'):
    C.live('corda', plain)


@pytest.mark.parametrize('max_bytes', [0, 1 << 20])
def test_squared_gradient_averages_each_batch_s_squared_gradient(max_bytes):
  """SPT's sensitivity: (dL/dW)^2 per batch, then the mean; not the squared mean."""
  params, batches = mlp_setup(5)
  cal = mlp_calibration(params, batches, loss_fn=loss, max_bytes=max_bytes)
  full = [P.flatten(jax.grad(loss)(params, b)) for b in batches]
  paths = ['fc1/kernel', 'shared/kernel', 'block_0/proj/kernel']
  got = dict(cal.iter_squared_gradients(paths))
  assert list(got) == paths
  for path in paths:
    want = np.mean([np.asarray(g[path], np.float64) ** 2 for g in full], axis=0)
    np.testing.assert_allclose(got[path], want, rtol=1e-5, atol=1e-12)
    squared_mean = np.mean([g[path] for g in full], axis=0) ** 2
    assert np.abs(want - squared_mean).max() > 0.1 * np.abs(want).max()
  np.testing.assert_allclose(cal.squared_gradient('fc1/kernel'), got['fc1/kernel'], rtol=1e-6)
  with pytest.raises(ValueError, match='need a loss_fn'):
    next(mlp_calibration(params, batches).iter_squared_gradients(paths))
