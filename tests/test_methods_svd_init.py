"""PiSSA, MiLoRA/SoMA, SORSA, SVFit, LoLDU, SoKA: factors against numpy / scipy, counts, SORSA's
regulariser, chains, errors (what every method promises is in test_methods_contract)."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import peftjax as pj
from peftjax.core import linalg
from peftjax.core import paths as P
from peftjax.core.adapter import describe_targets
from peftjax.core.leaves import LowRank, dense, materialize
from peftjax.methods import svd_init as S

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


def calc_ortho_reference(state):
  """numpy transcription of the official `calc_ortho` (sorsalib/src/sorsa/layer.py) and its
  gradient, in the reference's torch layout: sorsa_A (r, in) = U_p^T, sorsa_B (out, r) = V_p.
  Per matrix ||M||_F with M = A A^T - I (or B^T B - I), whose gradient is 2 M A / ||M||_F
  (or 2 B M / ||M||_F); the loss is the mean over all A and B."""
  terms, grads = [], {}
  for path, st in state.items():
    a = np.asarray(st['u'], np.float64).T
    b = np.asarray(st['vt'], np.float64).T
    ma, mb = a @ a.T - np.eye(len(a)), b.T @ b - np.eye(b.shape[1])
    na, nb = np.linalg.norm(ma, 'fro'), np.linalg.norm(mb, 'fro')
    terms += [na, nb]
    grads[path] = {'u': (2 * ma @ a / na).T, 'vt': (2 * b @ mb / nb).T}
  den = len(terms)
  return sum(terms) / den, jax.tree.map(lambda g: g / den, grads)


def test_sorsa_regularizer_is_the_official_calc_ortho_with_its_gradient():
  _, _, _, state = initialised('sorsa', 0)
  for st in state.values():
    np.testing.assert_allclose(st['u'].T @ st['u'], np.eye(st['s'].shape[0]), atol=1e-5)
    np.testing.assert_allclose(st['vt'] @ st['vt'].T, np.eye(st['s'].shape[0]), atol=1e-5)
    assert np.all(np.diff(np.asarray(st['s'])) <= 0)
  exact = {p: {'u': jnp.eye(5)[:, :2], 's': jnp.ones(2), 'vt': jnp.eye(3)[:2]} for p in 'xy'}
  value, grads = jax.value_and_grad(S.orthonormality)(exact)  # 0, and no NaN at 0 (as torch)
  assert float(value) == 0.0 and all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))
  moved = perturb(state, 5, 0.1)
  value, grads = jax.jit(jax.value_and_grad(S.orthonormality))(moved)
  want, want_grads = calc_ortho_reference(moved)
  assert want > 1e-2
  np.testing.assert_allclose(value, want, rtol=1e-5)
  for path in moved:
    np.testing.assert_allclose(grads[path]['u'], want_grads[path]['u'], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads[path]['vt'], want_grads[path]['vt'], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(grads[path]['s'], 0)


def test_sorsa_update_adds_gamma_over_lr_times_the_regularizer_gradient_after_clipping(
    optimizer_input):
  """The official trainer: clip the task gradient, add (gamma / lr) grad R, then the optimiser;
  with SGD at lr that is the paper's W <- W - lr grad L - gamma grad R."""
  adapter, _, _, state = initialised('sorsa', 0)
  moved = perturb(state, 5, 0.1)
  _, reg = calc_ortho_reference(moved)
  lr, gamma = 1e-2, adapter.config['gamma']
  # Only the regulariser: one SGD step moves the factors by exactly -gamma grad R.
  sgd = optax.chain(pj.transform(adapter, lr), optax.sgd(lr))
  zero = jax.tree.map(jnp.zeros_like, moved)
  step, _ = sgd.update(zero, sgd.init(moved), moved)
  for path in moved:
    for k in ('u', 'vt'):
      np.testing.assert_allclose(step[path][k], -gamma * reg[path][k], rtol=1e-4, atol=1e-8)
  # In the trainer's optimiser: the task gradient (adapter and head) is clipped first.
  task = {'adapter': perturb(zero, 6, 1.0), 'head': {'kernel': jnp.full((3, 2), 4.0)}}
  trainable = {'adapter': moved, 'head': {'kernel': jnp.zeros((3, 2))}}
  norm = float(optax.tree.norm(task))
  got = optimizer_input(adapter, task, trainable, lr=lr, clip_norm=1.0)
  np.testing.assert_allclose(got['head']['kernel'], task['head']['kernel'] / norm, rtol=1e-4)
  for path in moved:
    for k in ('u', 'vt'):
      np.testing.assert_allclose(got['adapter'][path][k],
                                 task['adapter'][path][k] / norm + gamma / lr * reg[path][k],
                                 rtol=1e-3, atol=1e-6)
  # update='loss': gamma * R joins the training loss instead, and there is no transform.
  as_loss = S.sorsa('kernel', rank=4, gamma=0.1, update='loss', rank_pattern={'out': 2})
  assert as_loss.tx is None
  np.testing.assert_allclose(pj.regularizer(as_loss, moved), 0.1 * calc_ortho_reference(moved)[0],
                             rtol=1e-5)
  assert adapter.loss is None and float(pj.regularizer(adapter, moved)) == 0.0
  with pytest.raises(ValueError, match="sorsa update must be one of .*got 'adam'"):
    S.sorsa('kernel', update='adam')


def test_sorsa_transform_goes_through_chains(optimizer_input):
  adapter, p, _, state = initialised('sorsa', 0)
  chained = pj.chain(adapter, pj.lora('layer_0/query/kernel', rank=2))
  _, c_state = chained.init(jax.random.key(0), p)
  moved = (perturb(state, 5, 0.1), c_state[1])
  zero = jax.tree.map(jnp.zeros_like, moved)
  got = optimizer_input(chained, {'adapter': zero, 'head': {}}, {'adapter': moved, 'head': {}})
  _, reg = calc_ortho_reference(moved[0])
  for path in reg:
    np.testing.assert_allclose(got['adapter'][0][path]['u'],
                               adapter.config['gamma'] / 1e-2 * reg[path]['u'], rtol=1e-3,
                               atol=1e-6)
  jax.tree.map(lambda g: np.testing.assert_array_equal(g, 0), got['adapter'][1])


def _fit_step(adapter, frozen, state, seed):
  """One gradient of a regression loss through `dense` on the applied tree."""
  x = jnp.asarray(np.random.default_rng(seed).standard_normal((6, 24)), jnp.float32)

  def loss(st):
    flat = P.flatten(adapter.apply(frozen, st))
    return sum(jnp.sum(jnp.tanh(dense(x[:, :flat[p].shape[0]], flat[p])) ** 2) for p in st)

  return jax.grad(loss)(state)


def spectral(seed, shape, decay=0.7):
  """U diag(8 decay^k) V^T with random orthonormal U, V: well-separated singular values."""
  rng, k = np.random.default_rng(seed), min(shape)
  u = np.linalg.qr(rng.standard_normal((shape[0], k)))[0]
  v = np.linalg.qr(rng.standard_normal((shape[1], k)))[0]
  return (u * 8.0 * decay ** np.arange(k)) @ v.T


FRESH = {'separated_tall': lambda: spectral(20, (12, 8)),
         'separated_wide': lambda: spectral(21, (8, 12)),
         'gaussian': lambda: np.random.default_rng(22).standard_normal((10, 7))}


def fresh(kind):
  """A fresh (float32) weight in a one-kernel tree, and the same weight in float64."""
  w = jnp.asarray(FRESH[kind](), jnp.float32)
  return {'layer': {'kernel': w}}, np.asarray(w, np.float64)


def np_svd(w):
  return np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)


def singular_values(w):
  return np.linalg.svd(np.asarray(materialize(w), np.float64), compute_uv=False)


@pytest.mark.parametrize('kind', list(FRESH))
@pytest.mark.parametrize('alpha', [None, 12.0])
@pytest.mark.parametrize('name', ['pissa', 'milora', 'soma'])
def test_principal_factors_and_residual_match_numpy_svd(name, alpha, kind):
  """PiSSA takes the r largest singular triplets, MiLoRA / SoMA the r smallest: the residual
  keeps the others, A^T A = B B^T = diag(those r singular values) / scale."""
  r, minor = 3, name != 'pissa'
  scale = 1.0 if alpha is None else alpha / r  # 4 with alpha 12: the scale matters
  p, w = fresh(kind)
  adapter = getattr(pj, name)('kernel', rank=r, alpha=alpha)
  frozen, state = adapter.init(jax.random.key(0), p)
  u, s, vt = np_svd(w)
  k = len(s)
  sel = slice(k - r, k) if minor else slice(0, r)
  kept = s[:k - r] if minor else s[r:]
  atol = 2e-5 * s[0]
  np.testing.assert_allclose(singular_values(frozen['layer']['kernel']),
                             np.concatenate([kept, np.zeros(r)]), atol=atol)
  a, b = (np.asarray(state['layer/kernel'][x], np.float64) for x in 'ab')
  assert a.shape == (w.shape[0], r) and b.shape == (r, w.shape[1])
  for gram in (a.T @ a, b @ b.T):
    np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=atol)
    np.testing.assert_allclose(np.sort(np.diag(gram)), np.sort(s[sel] / scale), atol=atol)
  np.testing.assert_allclose(np.diag(a.T @ a), np.diag(b @ b.T), atol=atol)  # S^1/2 on each
  np.testing.assert_allclose(scale * a @ b, (u[:, sel] * s[sel]) @ vt[sel], atol=5 * atol)
  assert adapter.apply(frozen, state)['layer']['kernel'].scale == scale


def check_svfit_against_numpy(w, fixed, values, r):
  """SVFit's trainable values are the top-r singular values of W; the fixed factors span (with
  paired signs) the top-r singular subspaces; the residual holds the rest of the spectrum."""
  u, s, vt = np_svd(w)
  atol = 2e-5 * s[0]
  np.testing.assert_allclose(values, s[:r], atol=atol)
  a, b = np.asarray(fixed.a, np.float64), np.asarray(fixed.b, np.float64)
  assert a.shape == (w.shape[0], r) and b.shape == (r, w.shape[1])
  np.testing.assert_allclose(a @ a.T, u[:, :r] @ u[:, :r].T, atol=1e-4)  # sign-invariant
  np.testing.assert_allclose(b.T @ b, vt[:r].T @ vt[:r], atol=1e-4)
  np.testing.assert_allclose((a * np.asarray(values)) @ b, (u[:, :r] * s[:r]) @ vt[:r],
                             atol=5 * atol)
  np.testing.assert_allclose(singular_values(fixed),
                             np.concatenate([s[r:], np.zeros(r)]), atol=atol)


def check_loldu_against_scipy(w, fixed, st, r, scale):
  """scipy's W^T = P L U with U = diag(D) U1: LoLDU's fixed factors are U1[:r]^T and
  (P L[:, :r])^T, its diagonal D[:r], its residual W - scale U1_r^T diag(D_r) (P L_r)^T."""
  wt = np.asarray(w, np.float64).T  # the (out, in) weight, as in the paper
  perm, l, u = scipy.linalg.lu(wt)
  d = np.diag(u)
  unit_u = u / d[:, None]
  np.testing.assert_allclose(perm @ l @ np.diag(d) @ unit_u, wt, atol=1e-10)
  np.testing.assert_allclose(np.diag(l), 1.0)
  np.testing.assert_allclose(np.asarray(st['d'], np.float64), d[:r], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(st['scale']), scale, rtol=1e-6)
  a, b = np.asarray(fixed.a, np.float64), np.asarray(fixed.b, np.float64)
  np.testing.assert_allclose(a, unit_u[:r].T, atol=1e-4)
  np.testing.assert_allclose(b, (perm @ l[:, :r]).T, atol=1e-5)
  np.testing.assert_allclose(
      np.asarray(materialize(fixed), np.float64),
      np.asarray(w, np.float64) - scale * (unit_u[:r].T * d[:r]) @ (perm @ l[:, :r]).T,
      atol=1e-4)


@pytest.mark.parametrize('kind', list(FRESH))
def test_svfit_and_loldu_fixed_factors_match_numpy_and_scipy(kind):
  p, w = fresh(kind)
  frozen, state = pj.svfit('kernel', rank=3).init(jax.random.key(0), p)
  check_svfit_against_numpy(w, frozen['layer']['kernel'], state['layer/kernel']['s'], 3)
  for kwargs, scale in (({'alpha': None}, 1.0), ({'alpha': 6.0}, 2.0), ({}, 1 / 3)):
    frozen, state = pj.loldu('kernel', rank=3, **kwargs).init(jax.random.key(0), p)
    check_loldu_against_scipy(w, frozen['layer']['kernel'], state['layer/kernel'], 3, scale)


def test_svfit_trains_only_the_top_singular_values():
  adapter, p, frozen, state = initialised('svfit', 3)
  flat_p, flat_f = P.flatten(p), P.flatten(frozen)
  for path, st in state.items():
    assert list(st) == ['s'] and st['s'].shape == (5,)
    fixed = flat_f[path]
    assert isinstance(fixed, LowRank) and fixed.scale == 0.0  # residual with its fixed factors
    check_svfit_against_numpy(flat_p[path], fixed, st['s'], 5)
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
    energy = np.cumsum(np.linalg.svd(np.asarray(flat_p[path], np.float64), compute_uv=False) ** 2)
    r = st['s'].shape[0]
    assert energy[r - 1] >= 0.8 * energy[-1] > energy[r - 2]  # the smallest such rank
    check_svfit_against_numpy(flat_p[path], P.flatten(frozen)[path], st['s'], r)


def test_loldu_trains_a_diagonal_and_a_scale_over_ldu_factors():
  adapter, p, frozen, state = initialised('loldu', 4)
  flat_p, flat_f = P.flatten(p), P.flatten(frozen)
  for path, st in state.items():
    r = 3 if 'out' in path else 4
    assert sorted(st) == ['d', 'scale'] and st['d'].shape == (r,) and st['scale'].shape == ()
    np.testing.assert_allclose(st['scale'], 8.0 / r)
    check_loldu_against_scipy(flat_p[path], flat_f[path], st, r, 8.0 / r)
    np.testing.assert_array_equal(jnp.tril(flat_f[path].a[:r].T, -1), 0)  # U_r is unit upper
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
