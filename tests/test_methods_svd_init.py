"""PiSSA, MiLoRA/SoMA, SORSA, SVFit, LoLDU, SoKA: exact at init, counts, round trips."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax as pj
from peftjax.core import linalg
from peftjax.core import paths as P
from peftjax.core.adapter import describe_targets
from peftjax.core.leaves import LowRank, dense, is_structured, materialize
from peftjax.io.adapter_file import load_adapter, save_adapter
from peftjax.methods import REGISTRY
from peftjax.methods import svd_init as S
from peftjax.models.bert import Bert, BertConfig

METHODS = {
    'pissa': lambda: S.pissa('kernel', rank=4, rank_pattern={'out': 2}),
    'pissa_fast': lambda: S.pissa('(query|value)/kernel', rank=3, alpha=6.0, niter=2,
                                  dropout=0.1),
    'milora': lambda: S.milora('kernel', rank=3, alpha=2.0),
    'soma': lambda: S.soma('value/kernel', rank=2),
    'sorsa': lambda: S.sorsa('kernel', rank=4, gamma=0.1, rank_pattern={'out': 2}),
    'svfit': lambda: S.svfit('kernel', rank=5),
    'loldu': lambda: S.loldu('kernel', rank=4, alpha=8.0, rank_pattern={'out': 3}),
    'soka': lambda: S.soka('kernel', rank=3, rank_pattern={'out': 2}),
    'soka_auto': lambda: S.soka('kernel', energy=0.6, max_rank=6),
}
INVERTIBLE = {'pissa', 'milora', 'soma', 'sorsa', 'soka'}


def params(seed):
  """Two layers of (24, 16) kernels with biases and a norm, and a (16, 24) output kernel."""
  rng = np.random.default_rng(seed)  # numpy draws: no per-shape compilation
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  layer = lambda: {'query': {'kernel': normal(24, 16), 'bias': normal(16)},
                   'value': {'kernel': normal(24, 16)}}
  return {'enc': {'layer_0': layer(), 'layer_1': layer()},
          'out': {'kernel': normal(16, 24)}, 'norm': {'scale': jnp.ones(16)}}


def perturb(state, seed, std=0.05):
  """The state moved a little in every leaf (as after some training)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda l: l + jnp.asarray(std * rng.standard_normal(l.shape), l.dtype),
                      state)


@functools.lru_cache(maxsize=None)
def initialised(name, seed):
  adapter = METHODS[name]()
  p = params(seed)
  return adapter, p, *adapter.init(jax.random.key(seed), p)


def expected_trainable(method, shape, r):
  d_in, d_out = shape
  if method == 'soka':
    m1, n2 = linalg.kron_shape(d_in)[0], linalg.kron_shape(d_out)[0]
    return r * (m1 * (d_out // n2) + (d_in // m1) * n2)
  return {'pissa': r * (d_in + d_out), 'milora': r * (d_in + d_out), 'soma': r * (d_in + d_out),
          'sorsa': r * (d_in + d_out + 1), 'svfit': r, 'loldu': r + 1}[method]


@pytest.mark.parametrize('name', list(METHODS))
@pytest.mark.parametrize('seed', [0, 1])
def test_effective_weight_and_outputs_equal_the_base_at_init(name, seed):
  adapter, p, frozen, state = initialised(name, seed)
  merged, flat_p, flat_f = pj.merge(adapter, frozen, state), P.flatten(p), P.flatten(frozen)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), merged, p)
  x = jnp.asarray(np.random.default_rng(seed + 7).standard_normal((5, 24)), jnp.float32)
  applied = P.flatten(adapter.apply(frozen, state))
  for path in state:
    np.testing.assert_allclose(dense(x[:, :flat_p[path].shape[0]], applied[path]),
                               x[:, :flat_p[path].shape[0]] @ flat_p[path], atol=1e-5)
    assert flat_f[path].shape == flat_p[path].shape
    residual = materialize(flat_f[path])
    assert float(jnp.abs(residual - flat_p[path]).max()) > 1e-3  # re-based on a residual
  for path, leaf in flat_p.items():  # everything else is the very same array
    if path not in state:
      assert flat_f[path] is leaf


@pytest.mark.parametrize('name', list(METHODS))
def test_trainable_counts_follow_the_formula(name):
  adapter, p, frozen, state = initialised(name, 2)
  method, flat = adapter.config['method'], P.flatten(p)
  info = describe_targets(adapter, frozen, state)
  assert sorted(info) == sorted(state)
  total = 0
  for path, row in info.items():
    r = row['rank']
    if name != 'soka_auto':
      r_expected = P.first_match(path, adapter.config['rank_pattern'], adapter.config['rank'])
      assert r == r_expected
    assert row['shape'] == list(flat[path].shape)
    assert row['trainable'] == expected_trainable(method, flat[path].shape, r)
    assert row['trainable'] == pj.num_params(state[path])
    total += row['trainable']
  assert pj.num_params(state) == total
  json.dumps(info)  # adapter files store it
  text = pj.summary(adapter, frozen, state)
  assert f'method: {method}' in text and f'trainable params: {total:,}' in text


def test_bert_outputs_are_unchanged_at_init():
  cfg = BertConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64)
  k1, k2 = jax.random.split(jax.random.key(3))
  ids = jax.random.randint(k2, (2, 6), 1, cfg.vocab_size)
  mask = jnp.ones_like(ids).at[1, 4:].set(0)
  p = Bert(cfg).init(k1, ids, mask)['params']
  run = jax.jit(lambda tree: Bert(cfg).apply({'params': tree}, ids, mask))
  base = run(p)
  targets = ['attention/(query|value)/kernel', 'intermediate/kernel']
  for adapter in (S.pissa(targets, 4), S.milora(targets, 4),
                  S.sorsa(targets, 4), S.svfit(targets, 4), S.loldu(targets, 4),
                  S.soka(targets, 'auto')):
    frozen, state = adapter.init(jax.random.key(0), p)
    assert len(state) == 3
    out = run(adapter.apply(frozen, state))
    np.testing.assert_allclose(out, base, atol=1e-5, err_msg=adapter.config['method'])
    moved = run(adapter.apply(frozen, perturb(state, 4, 0.5)))
    assert float(jnp.abs(moved - base).max()) > 1e-3, adapter.config['method']


def test_sorsa_regularizer_is_zero_at_init_and_has_the_right_gradient():
  adapter, p, frozen, state = initialised('sorsa', 0)
  assert float(pj.regularizer(adapter, state)) < 1e-9
  for path, st in state.items():
    np.testing.assert_allclose(st['u'].T @ st['u'], np.eye(st['s'].shape[0]), atol=1e-5)
    np.testing.assert_allclose(st['vt'] @ st['vt'].T, np.eye(st['s'].shape[0]), atol=1e-5)
    assert np.all(np.diff(np.asarray(st['s'])) <= 0)
  moved = perturb(state, 5, 0.1)
  value, grads = jax.jit(jax.value_and_grad(adapter.loss))(moved)
  expected = 0.0
  for path, st in moved.items():
    u, vt = st['u'], st['vt']
    eye = jnp.eye(u.shape[1])
    expected += jnp.sum((u.T @ u - eye) ** 2) + jnp.sum((vt @ vt.T - eye) ** 2)
    np.testing.assert_allclose(grads[path]['u'], 0.1 * 4 * u @ (u.T @ u - eye), atol=1e-5)
    np.testing.assert_allclose(grads[path]['vt'], 0.1 * 4 * (vt @ vt.T - eye) @ vt, atol=1e-5)
    np.testing.assert_array_equal(grads[path]['s'], 0)
  assert float(value) > 1e-3
  np.testing.assert_allclose(value, 0.1 * expected, rtol=1e-5)
  # the regulariser goes through chains too
  chained = pj.chain(adapter, pj.lora('layer_0/query/kernel', rank=2))
  c_frozen, c_state = chained.init(jax.random.key(0), p)
  np.testing.assert_allclose(chained.loss((moved, c_state[1])), value, rtol=1e-6)


def _fit_step(adapter, frozen, state, seed):
  """One gradient of a regression loss through `dense` on the applied tree."""
  x = jnp.asarray(np.random.default_rng(seed).standard_normal((6, 24)), jnp.float32)

  def loss(st):
    flat = P.flatten(adapter.apply(frozen, st))
    return sum(jnp.sum(jnp.tanh(dense(x[:, :flat[p].shape[0]], flat[p])) ** 2) for p in st)

  return jax.grad(loss)(state)


def test_svfit_trains_only_the_top_singular_values():
  adapter, p, frozen, state = initialised('svfit', 3)
  flat_p, flat_f = P.flatten(p), P.flatten(frozen)
  for path, st in state.items():
    assert list(st) == ['s'] and st['s'].shape == (5,)
    fixed = flat_f[path]
    assert isinstance(fixed, LowRank) and fixed.scale == 0.0  # residual with its fixed factors
    u, s, vt = linalg.svd_top(flat_p[path], 5)
    np.testing.assert_allclose(st['s'], s, rtol=1e-5)
    np.testing.assert_allclose(fixed.a, u, atol=1e-5)
    np.testing.assert_allclose(fixed.b, vt, atol=1e-5)
  grads = _fit_step(adapter, frozen, state, 3)
  assert jax.tree.structure(grads) == jax.tree.structure(state)
  assert all(float(jnp.abs(g['s']).min()) > 0 for g in grads.values())
  trained = jax.tree.map(lambda a, g: a - 0.1 * g, state, grads)
  merged = P.flatten(pj.merge(adapter, frozen, trained))
  jitted = jax.jit(lambda f, s: pj.merge(adapter, f, s))(jax.device_put(frozen), trained)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), P.flatten(jitted), merged)
  for path, st in trained.items():  # the update lives in the fixed singular subspaces
    f = flat_f[path]
    np.testing.assert_allclose(merged[path] - flat_p[path], (f.a * (st['s'] - state[path]['s']))
                               @ f.b, atol=1e-5)
  with pytest.raises(NotImplementedError, match="'svfit' cannot be unmerged"):
    pj.unmerge(adapter, pj.merge(adapter, frozen, trained), trained)
  with pytest.raises(ValueError, match='svfit: the frozen leaf at .* holds no fixed factors'):
    adapter.apply(p, state)
  # rank=None keeps, per target, the smallest rank holding `energy` of the spectrum
  frozen, state = S.svfit('kernel', None, energy=0.8).init(jax.random.key(0), p)
  for path, st in state.items():
    assert st['s'].shape[0] == linalg.energy_rank(linalg.svd(flat_p[path])[1], 0.8)


def test_loldu_trains_a_diagonal_and_a_scale_over_ldu_factors():
  adapter, p, frozen, state = initialised('loldu', 4)
  flat_p, flat_f = P.flatten(p), P.flatten(frozen)
  for path, st in state.items():
    r = 3 if 'out' in path else 4
    assert sorted(st) == ['d', 'scale'] and st['d'].shape == (r,) and st['scale'].shape == ()
    np.testing.assert_allclose(st['scale'], 8.0 / r)
    perm, l, d, u = linalg.ldu(flat_p[path].T)  # the (out, in) weight, as in the paper
    fixed = flat_f[path]
    np.testing.assert_allclose(st['d'], d[:r], rtol=1e-6)
    np.testing.assert_allclose(fixed.a, u[:r].T, atol=1e-6)
    np.testing.assert_allclose(fixed.b, (perm @ l[:, :r]).T, atol=1e-6)
    np.testing.assert_array_equal(jnp.tril(fixed.a[:r].T, -1), 0)  # U_r is unit upper
  grads = _fit_step(adapter, frozen, state, 4)
  for g in grads.values():
    assert float(jnp.abs(g['d']).min()) > 0 and float(jnp.abs(g['scale'])) > 0
  trained = perturb(state, 4, 0.3)
  merged = P.flatten(pj.merge(adapter, frozen, trained))
  for path, st in trained.items():
    f = flat_f[path]
    np.testing.assert_allclose(merged[path], f.w + (f.a * st['d'] * st['scale']) @ f.b,
                               atol=1e-5)


def test_soka_reaches_its_energy_threshold_and_reports_it():
  p = params(5)
  flat = P.flatten(p)
  for rank, thresh in (('energy', 0.7), ('elbow', 0.9), ('auto', 0.8), (4, 0.9)):
    adapter = S.soka('kernel', rank, energy=thresh)
    frozen, state = adapter.init(jax.random.key(0), p)
    info, flat_f = describe_targets(adapter, frozen, state), P.flatten(frozen)
    for path, ab in state.items():
      (d_in, d_out), m1, n2 = flat[path].shape, 4, 4
      assert ab['a'].shape[1:] == (m1, d_out // n2) and ab['b'].shape[1:] == (d_in // m1, n2)
      assert info[path]['factors'] == f'{m1}x{d_out // n2}*{d_in // m1}x{n2}'
      _, s, _ = linalg.kpsvd(flat[path], (m1, d_out // n2))
      cum = linalg.energy(s)
      by_energy, by_elbow = linalg.energy_rank(s, thresh), linalg.elbow_rank(s)
      r = {'energy': by_energy, 'elbow': by_elbow, 'auto': min(by_energy, by_elbow)}.get(rank, 4)
      assert ab['a'].shape[0] == r == info[path]['rank']
      # the factors reconstruct the weight to the reported energy
      kept = 1 - float(jnp.sum(materialize(flat_f[path]) ** 2) / jnp.sum(flat[path] ** 2))
      assert info[path]['energy'] == pytest.approx(cum[r - 1], abs=1e-5)
      assert kept == pytest.approx(cum[r - 1], abs=1e-5)
      if rank == 'energy':
        assert cum[r - 1] >= thresh > (cum[r - 2] if r > 1 else 0)
  frozen, state = S.soka('kernel', 'energy', energy=0.99, max_rank=2).init(jax.random.key(0), p)
  assert all(ab['a'].shape[0] == 2 for ab in state.values())
  custom = S.soka('out/kernel', 2, factor_pattern={'out': [2, 8]})
  frozen, state = custom.init(jax.random.key(0), p)
  assert state['out/kernel']['a'].shape == (2, 2, 8) and state['out/kernel']['b'].shape == (2, 8, 3)
  np.testing.assert_allclose(pj.merge(custom, frozen, state)['out']['kernel'], p['out']['kernel'],
                             atol=1e-5)


@pytest.mark.parametrize('name', list(METHODS))
def test_merge_unmerge_save_load_and_from_config_round_trip(tmp_path, name):
  adapter, p, frozen, state = initialised(name, 6)
  trained = perturb(state, 6)
  merged = pj.merge(adapter, frozen, trained)
  assert not any(map(is_structured, jax.tree.leaves(merged, is_leaf=is_structured)))
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, merged, p)))
  if name.split('_')[0] in INVERTIBLE:
    restored = pj.unmerge(adapter, merged, trained)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), restored, frozen)
  else:
    assert adapter.unmerge is None
  save_adapter(tmp_path / 'a', adapter, frozen, trained, base_model='tiny')
  loaded, frozen2, state2, _, meta = load_adapter(tmp_path / 'a', p, rng=jax.random.key(99))
  assert loaded.config == adapter.config == meta['method']
  jax.tree.map(np.testing.assert_array_equal, state2, trained)
  jax.tree.map(np.testing.assert_array_equal, frozen2, frozen)
  jax.tree.map(np.testing.assert_array_equal, pj.merge(loaded, frozen2, state2), merged)
  rebuilt = pj.from_config(json.loads(json.dumps(adapter.config)))
  assert rebuilt.config == adapter.config
  frozen3, state3 = rebuilt.init(jax.random.key(5), p)
  jax.tree.map(np.testing.assert_array_equal, (frozen3, state3), (frozen, state))
  leaves = lambda t: jax.tree.leaves(t, is_leaf=is_structured)
  for x, y in zip(leaves(adapter.apply(frozen, trained)), leaves(rebuilt.apply(frozen3, trained))):
    assert type(x) is type(y)
    if isinstance(x, LowRank):
      assert (x.scale, x.dropout) == (y.scale, y.dropout)


def test_chains_with_lora():
  p = params(7)
  for first in (S.pissa('query/kernel', 3), S.svfit('query/kernel', 3), S.soka('query/kernel', 2)):
    chained = pj.chain(first, pj.lora('kernel', rank=2))
    frozen, (s1, s2) = chained.init(jax.random.key(7), p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 pj.merge(chained, frozen, (s1, s2)), p)
    s2 = perturb(s2, 7, 0.2)
    by_parts = P.flatten(pj.merge(first, frozen, s1))
    merged = P.flatten(pj.merge(chained, frozen, (s1, s2)))
    for path, ab in s2.items():
      np.testing.assert_allclose(merged[path], by_parts[path] + 8.0 * ab['a'] @ ab['b'], atol=1e-5)
    assert (chained.unmerge is not None) == (first.config['method'] != 'svfit')
  with pytest.raises(ValueError, match="only the first method of a chain may re-base.*'pissa'"):
    pj.chain(pj.lora('kernel', rank=2), S.pissa('kernel', 2)).init(jax.random.key(0), p)


def test_errors_name_the_problem():
  p, key = params(8), jax.random.key(8)
  for make in (S.pissa, S.milora, S.soma, S.sorsa, S.svfit, S.loldu):
    name = make.__name__
    with pytest.raises(ValueError, match=rf'{name} rank 17 exceeds min\(24, 16\) of enc/.*kernel'):
      make('query/kernel', rank=17).init(key, p)
    with pytest.raises(pj.PatternError, match=r"'qurey' matches no 2-D parameter.*closest"):
      make(['value', 'qurey'], rank=2).init(key, p)
    with pytest.raises(pj.PatternError, match="rank_pattern: pattern 'layer_9'"):
      make('kernel', rank=2, rank_pattern={'layer_9': 1}).init(key, p)
    with pytest.raises(ValueError, match='must be a positive int'):
      make('kernel', rank=0).init(key, p)
  with pytest.raises(ValueError, match='soka rank 17 exceeds the Kronecker rank 16 of'):
    S.soka('query/kernel', 17).init(key, p)
  with pytest.raises(ValueError, match=r"soka rank 'knee' must be an int or one of"):
    S.soka('kernel', 'knee')
  with pytest.raises(ValueError, match=r'\(5, 4\) does not divide \(24, 16\)'):
    S.soka('query/kernel', 2, factor_pattern={'query': [5, 4]}).init(key, p)
  with pytest.raises(pj.PatternError, match="factor_pattern: pattern 'nowhere'"):
    S.soka('kernel', 2, factor_pattern={'nowhere': [2, 2]}).init(key, p)
  for bad in (dict(energy=0.0), dict(energy=1.5)):
    with pytest.raises(ValueError, match=r'energy must be in \(0, 1\]'):
      S.soka('kernel', **bad)
    with pytest.raises(ValueError, match=r'energy must be in \(0, 1\]'):
      S.svfit('kernel', **bad)
  with pytest.raises(ValueError, match=r'pissa dropout must be in \[0, 1\)'):
    S.pissa('kernel', dropout=1.0)
  with pytest.raises(ValueError, match='pissa niter must be None'):
    S.pissa('kernel', niter=-1)
  with pytest.raises(ValueError, match='sorsa gamma must be >= 0'):
    S.sorsa('kernel', gamma=-1.0)


def test_low_precision_weights_keep_their_dtype():
  p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params(9))
  for adapter in (S.pissa('kernel', 2), S.svfit('kernel', 2), S.loldu('kernel', 2),
                  S.soka('kernel', 2)):
    frozen, state = adapter.init(jax.random.key(0), p)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((frozen, state)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), atol=0.05),
        pj.merge(adapter, frozen, state), p)


def test_configs_are_plain_json_and_registered():
  for make in METHODS.values():
    config = make().config
    assert json.loads(json.dumps(config)) == config
    assert pj.from_config(config).config == config
  for name in ('pissa', 'milora', 'soma', 'sorsa', 'svfit', 'loldu', 'soka'):
    assert REGISTRY[name] is getattr(S, name)
