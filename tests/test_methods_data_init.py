"""CorDA, EVA and LoRA-GA on a tiny random BERT and a plain Flax model with known spectra (what
every method promises is in test_methods_contract)."""
from __future__ import annotations

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import minilm_vader
import peftjax as pj
from peftjax import tasks
from peftjax.core import calib as C
from peftjax.core import paths as P
from peftjax.core.adapter import describe_targets
from peftjax.io.adapter_file import load_adapter
from peftjax.methods.data_init import (corda, damped_covariance, eva, eva_ranks,
                                       explained_variance, lora_ga)
from peftjax.models import TINY_BERT
from peftjax.models.bert import Bert, BertConfig, mean_pool
from peftjax.train import loop

CFG = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                 intermediate_size=64)
TARGETS = ['attention/(query|value)/kernel', 'intermediate/kernel']


@functools.lru_cache(maxsize=None)
def setup(seed):
  """A tiny BERT's params, three padded batches and a Calibration on them."""
  keys = jax.random.split(jax.random.key(seed), 7)
  batches = []
  for k_ids, k_len in zip(keys[1:4], keys[4:]):
    ids = jax.random.randint(k_ids, (4, 8), 1, CFG.vocab_size)
    mask = (jnp.arange(8)[None] < jax.random.randint(k_len, (4, 1), 3, 9)).astype(jnp.int32)
    batches.append({'input_ids': ids, 'attention_mask': mask})
  params = Bert(CFG).init(keys[0], batches[0]['input_ids'], batches[0]['attention_mask'])
  params = params['params']
  head = jax.random.normal(keys[0], (32, 3))

  def loss_fn(p, b):
    logits = mean_pool(forward(p, b), b['attention_mask']) @ head
    return -jnp.mean(jax.nn.log_softmax(logits)[:, 0])

  cal = C.Calibration(forward, params, batches, loss_fn=loss_fn,
                      mask_fn=lambda b: b['attention_mask'])
  return params, batches, cal


def forward(params, batch):
  return Bert(CFG).apply({'params': params}, batch['input_ids'], batch['attention_mask'])


def randomize(state, seed, std=0.1):
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [l + std * jax.random.normal(k, l.shape)
                                      for k, l in zip(keys, leaves)])


@pytest.mark.parametrize('mode', ['kpm', 'ipm'])
def test_corda_adapter_takes_the_smallest_or_largest_covariance_weighted_components(mode):
  params, _, cal = setup(0)
  adapter = corda(TARGETS, rank=3, mode=mode, alpha=6.0, damping=0.05)
  frozen, state = adapter.init(jax.random.key(0), params, calib=cal)
  flat, res = P.flatten(params), P.flatten(pj.materialize(frozen))
  covariances = dict(cal.iter_covariances(list(state)))  # the group init used: no recompile
  for path, ab in state.items():
    cov = np.asarray(covariances[path], np.float64)
    ct = np.asarray(damped_covariance(cov, 0.05), np.float64)
    np.testing.assert_allclose(ct, cov + 0.05 * np.mean(np.diag(cov)) * np.eye(len(ct)),
                               rtol=1e-6)
    energy = np.linalg.svd(ct @ np.asarray(flat[path], np.float64), compute_uv=False)
    delta = (6.0 / 3) * np.asarray(ab['a'], np.float64) @ np.asarray(ab['b'], np.float64)
    got = np.linalg.svd(ct @ delta, compute_uv=False)[:3]
    rest = np.linalg.svd(ct @ np.asarray(res[path], np.float64), compute_uv=False)
    want, kept = (energy[:3], energy[3:]) if mode == 'ipm' else (energy[-3:], energy[:-3])
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(rest[:len(kept)], kept, rtol=2e-3, atol=1e-5)


class Branches(nn.Module):
  """Two independent Dense layers, each on its own input."""

  @nn.compact
  def __call__(self, batch):
    return nn.Dense(8, name='low')(batch['low']), nn.Dense(8, name='flat')(batch['flat'])


def spectra_setup(n=600):
  """'low' inputs span 6 of 16 dims with equal variance; 'flat' inputs are isotropic."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(7), 4)
  basis = np.linalg.qr(np.asarray(jax.random.normal(k1, (16, 6))))[0]
  low = np.asarray(jax.random.normal(k2, (n, 6))) @ basis.T
  low = low + 1e-3 * np.asarray(jax.random.normal(k3, (n, 16)))
  flat = np.asarray(jax.random.normal(k4, (n, 16)))
  batches = [{'low': low[i::3].astype(np.float32), 'flat': flat[i::3].astype(np.float32)}
             for i in range(3)]
  params = Branches().init(jax.random.key(0), batches[0])['params']
  cal = C.Calibration(lambda p, b: Branches().apply({'params': p}, b), params, batches)
  return params, cal, basis, {'low/kernel': low, 'flat/kernel': flat}


def test_eva_allocates_the_budget_by_explained_variance():
  params, cal, basis, inputs = spectra_setup()
  adapter = eva(['low', 'flat'], rank=4, rho=2.0)
  frozen, state = adapter.init(jax.random.key(0), params, calib=cal)
  info = describe_targets(adapter, frozen, state)
  ranks = {p: info[p]['rank'] for p in info}
  assert ranks == {'low/kernel': 6, 'flat/kernel': 2}
  assert sum(ranks.values()) == 4 * 2  # the budget: rank x number of targets
  ratios = {}
  for path, x in inputs.items():
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    ratios[path] = (s ** 2 / np.sum(s ** 2))[:8]
  assert eva_ranks(ratios, 8) == ranks
  a = np.asarray(state['low/kernel']['a'])  # A spans the 6 high-variance directions
  np.testing.assert_allclose(a.T @ a, np.eye(6), atol=1e-5)
  np.testing.assert_allclose(basis @ (basis.T @ a), a, atol=1e-3)
  assert not np.any(np.asarray(state['flat/kernel']['b']))
  assert info['low/kernel']['scale'] == pytest.approx(16.0 / 6)
  frozen, state = eva(['low', 'flat'], rank=4, rho=1.0).init(jax.random.key(0), params, calib=cal)
  assert {p: ab['a'].shape[1] for p, ab in state.items()} == {'low/kernel': 4, 'flat/kernel': 4}


def test_eva_rank_allocation_caps_at_rho_and_drops_unneeded_layers():
  ratios = {'a': np.array([0.5, 0.3, 0.1]), 'b': np.array([0.05, 0.01, 0.0]),
            'c': np.array([0.4, 0.2, 0.2])}
  assert eva_ranks(ratios, 6) == {'a': 3, 'b': 0, 'c': 3}
  assert eva_ranks(ratios, 4) == {'a': 2, 'b': 0, 'c': 2}
  assert eva_ranks({'a': np.array([0.2, 0.2]), 'b': np.array([0.2])}, 2) == {'a': 2, 'b': 0}
  rows = np.concatenate([np.diag([3.0, 2.0, 1.0, 0.0]), -np.diag([3.0, 2.0, 1.0, 0.0])])
  v, s, r = explained_variance(rows + 5.0, 2)  # centred: the offset does not count
  np.testing.assert_allclose(r, np.array([18, 8]) / 28, rtol=1e-5)
  np.testing.assert_allclose(np.abs(np.asarray(v)), np.eye(4)[:, :2], atol=1e-5)
  params, cal, _, _ = spectra_setup()
  frozen, state = eva(['low', 'flat'], rank=2, rho=1.5).init(jax.random.key(0), params,
                                                              calib=cal)
  assert {p: ab['a'].shape[1] for p, ab in state.items()} == {'low/kernel': 3,
                                                              'flat/kernel': 1}


def test_eva_whitening_and_adjusted_scaling_against_numpy():
  """whiten: A = V_r diag(s_r)^-1/2 (the input's top right-singular vectors over the square
  roots of their singular values); adjust_scaling_factors: scale alpha / rank on every layer,
  whatever rank it was allotted."""
  params, cal, _, inputs = spectra_setup()
  adapter = eva(['low', 'flat'], rank=4, rho=2.0, alpha=8.0, whiten=True,
                adjust_scaling_factors=True)
  frozen, initial = adapter.init(jax.random.key(0), params, calib=cal)
  assert {p: ab['a'].shape[1] for p, ab in initial.items()} == {'low/kernel': 6,
                                                                'flat/kernel': 2}
  state = randomize(initial, 5)  # B != 0, so that the merge shows the scale
  merged = P.flatten(pj.merge(adapter, frozen, state))
  for path, ab in state.items():
    x = inputs[path].astype(np.float32).astype(np.float64)
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    r = ab['a'].shape[1]
    a = np.asarray(initial[path]['a'], np.float64)
    np.testing.assert_allclose(a.T @ a, np.diag(1 / s[:r]), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(np.abs(vt[:r] @ a), np.diag(s[:r] ** -0.5), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(merged[path] - P.flatten(params)[path],
                               (8.0 / 4) * np.asarray(ab['a']) @ np.asarray(ab['b']),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('direction', [None, 'A2rBr'])
def test_lora_ga_factors_are_gradient_singular_vectors_with_the_stable_scale(direction):
  """Torch layout G (out, in) = U S V^T: 'ArB2r' (the default) is A = V[:, :r]^T, B = U[:, r:2r];
  'A2rBr' is A = V[:, r:2r]^T, B = U[:, :r]. Here A = A_torch^T, B = B_torch^T."""
  params, _, cal = setup(0)
  kwargs = {} if direction is None else {'direction': direction}
  adapter = lora_ga(TARGETS, rank=3, alpha=6.0, stable_gamma=4.0, **kwargs)
  frozen, state = adapter.init(jax.random.key(0), params, calib=cal)
  grads = dict(cal.iter_gradients(list(state)))
  for path, ab in state.items():
    g_torch = np.asarray(grads[path], np.float64).T  # (out, in), the paper's layout
    u, _, vt = np.linalg.svd(g_torch, full_matrices=False)
    v = vt.T
    a_rows, b_cols = (v[:, 3:6], u[:, :3]) if direction == 'A2rBr' else (v[:, :3], u[:, 3:6])
    c = g_torch.shape[0] ** 0.25 / math.sqrt(4.0)  # d_out^(1/4) / sqrt(stable_gamma)
    a, b = np.asarray(ab['a']) / c, np.asarray(ab['b']) / c
    np.testing.assert_allclose(np.abs(a_rows.T @ a), np.eye(3), atol=1e-3)
    np.testing.assert_allclose(np.abs(b_cols.T @ b.T), np.eye(3), atol=1e-3)
    np.testing.assert_allclose(
        P.flatten(pj.materialize(frozen))[path],
        P.flatten(params)[path] - 2.0 * np.asarray(ab['a']) @ np.asarray(ab['b']), atol=1e-6)
  with pytest.raises(ValueError, match='2 \\* rank'):
    lora_ga(TARGETS, rank=17).init(jax.random.key(0), params, calib=cal)
  with pytest.raises(ValueError, match="direction must be one of .*'ArBr'"):
    lora_ga(TARGETS, direction='ArBr')


def test_trainable_counts_follow_the_formulas():
  params, _, cal = setup(0)
  flat = P.flatten(params)
  for adapter in (corda(TARGETS, rank=3, rank_pattern={'value': 2}),
                  lora_ga(TARGETS, rank=3, rank_pattern={'value': 2})):
    frozen, state = adapter.init(jax.random.key(0), params, calib=cal)
    want = sum((2 if 'value' in p else 3) * sum(flat[p].shape)
               for p in P.select(flat, TARGETS))
    assert pj.num_params(state) == want
    info = describe_targets(adapter, frozen, state)
    assert sum(i['trainable'] for i in info.values()) == want
  adapter = eva(TARGETS, rank=3)
  frozen, state = adapter.init(jax.random.key(0), params, calib=cal)
  info = describe_targets(adapter, frozen, state)
  assert sorted(info) == sorted(P.select(flat, TARGETS))
  assert sum(i['rank'] for i in info.values()) == 3 * len(info)
  assert pj.num_params(state) == sum(i['rank'] * sum(flat[p].shape) for p, i in info.items())


def test_init_without_calibration_data_is_a_clear_error():
  params, _, _ = setup(0)
  for adapter in (corda(TARGETS), eva(TARGETS), lora_ga(TARGETS)):
    with pytest.raises(ValueError, match='calib=Calibration'):
      adapter.init(jax.random.key(0), params)


def test_trainer_runs_corda_end_to_end(tmp_path):
  c = minilm_vader.get_config()
  c.model = ml_collections.ConfigDict(TINY_BERT)
  c.data.limit, c.data.max_length = 48, 32
  c.train.batch_size, c.train.eval_batch_size, c.train.epochs = 16, 48, 1
  c.method = ml_collections.ConfigDict({'name': 'corda', 'targets': ('attention/value/kernel',),
                                        'rank': 2, 'mode': 'ipm'})
  c.calibration.batches = 2
  summary = loop.train(c, tmp_path)
  assert summary['steps'] == 3 and 0.0 <= summary['test_accuracy'] <= 1.0
  assert summary['trainable_params'] == 2 * 2 * (32 + 32) + 32 * 2 + 2
  task = tasks.build(c)
  _, frozen, state, head, _ = load_adapter(tmp_path / 'adapter', task.model.params)
  assert head is not None and pj.num_params(state) == 2 * 2 * (32 + 32)
  # A resume rebuilds the calibration: it must give the saved factors bit for bit.
  k_adapter, k_head = jax.random.split(jax.random.key(c.seed))
  head = task.init_head(k_head)
  batches = lambda: itertools.islice(task.batches('train', 16, seed=c.seed), 2)
  again, _ = loop.method_from_config(c.method).init(
      k_adapter, task.model.params, calib=task.calibration(head, batches))
  saved = {p: l for p, l in P.flatten(frozen).items() if isinstance(l, C.CalibratedResidual)}
  assert len(saved) == 2
  for path, leaf in saved.items():
    for part in ('w', 'a', 'b'):
      np.testing.assert_array_equal(getattr(P.flatten(again)[path], part), getattr(leaf, part))
