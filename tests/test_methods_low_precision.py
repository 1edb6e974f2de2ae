"""Low-precision adapters (Jie, Wang & Deng, ICCV 2023): the error-minimising codebook and
scale, the bound of the quantiser, straight-through gradients, packed files of the right
size that load as the dequantised state, and clear errors."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from scipy.stats import norm

import peftjax as pj
from peftjax.core.adapter import Adapter
from peftjax.io.adapter_file import WEIGHTS_FILE
from peftjax.methods.low_precision import (EPS, Quantized, codebook, dequantize, dequantized,
                                           fake_quantize, quantize, round_to_codes)

BITS = (1, 2, 4, 8)


def official_codebook(bits, iterations=500):
  """The official `QLinear.quantize`: 500 iterations from all-zero codes."""
  values = np.zeros(2 ** bits)
  for _ in range(iterations):
    cdf = np.concatenate([[0.0], norm.cdf((values[1:] + values[:-1]) / 2), [1.0]])
    values = norm.ppf((cdf[1:] + cdf[:-1]) / 2)
  return values


def expected_abs_error(codes):
  """E|n - Q(n)| for n ~ N(0, 1), Q the nearest of `codes` (closed form per cell)."""
  c = np.sort(codes)
  edges = np.concatenate([[-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]])
  a, b = edges[:-1], edges[1:]
  # int_a^b |x - c| phi = int_c^b (x - c) phi + int_a^c (c - x) phi, with int x phi = -phi
  above = norm.pdf(c) - norm.pdf(b) - c * (norm.cdf(b) - norm.cdf(c))
  below = c * (norm.cdf(c) - norm.cdf(a)) - (norm.pdf(a) - norm.pdf(c))
  return float(np.sum(above + below))


def gaussian(seed, shape=(64, 48), mean=0.02, std=0.05):
  return jnp.asarray(np.random.default_rng(seed).normal(mean, std, shape), jnp.float32)


@pytest.mark.parametrize('bits', [1, 2, 4])
def test_codebook_is_the_official_one_where_it_converged(bits):
  np.testing.assert_allclose(codebook(bits), official_codebook(bits), atol=1e-7)


def test_codebook_is_the_median_fixed_point_and_minimises_the_absolute_error():
  np.testing.assert_allclose(codebook(1), [-norm.ppf(0.75), norm.ppf(0.75)], rtol=1e-12)
  for bits in BITS:
    codes = codebook(bits)
    assert codes.shape == (2 ** bits,) and np.all(np.diff(codes) > 0)
    np.testing.assert_allclose(codes, -codes[::-1], atol=1e-12)
    best = expected_abs_error(codes)
    for factor in (0.98, 1.02):  # another scale of the same codes
      assert expected_abs_error(codes * factor) > best
    for i in range(0, 2 ** bits, max(1, 2 ** bits // 8)):  # moving any one code
      for step in (-1e-3, 1e-3):
        moved = codes.copy()
        moved[i] += step
        assert expected_abs_error(moved) > best, (bits, i, step)
  # The official 500 iterations stop short at 8 bits.
  assert expected_abs_error(codebook(8)) < expected_abs_error(official_codebook(8)) / 4


@pytest.mark.parametrize('bits', BITS)
def test_error_minimising_scale_beats_the_max_abs_scale(bits):
  w = gaussian(bits)
  ours = float(jnp.mean(jnp.abs(w - fake_quantize(w, bits))))
  wn = np.asarray(w, np.float64)
  top = np.abs(wn).max()
  grid = np.linspace(-top, top, 2 ** bits)  # uniform grid at the max-abs scale
  uniform = np.abs(wn[..., None] - grid).min(-1).mean()
  codes = codebook(bits) * top / codebook(bits)[-1]  # the same codes at the max-abs scale
  scaled = np.abs(wn[..., None] - codes).min(-1).mean()
  assert ours < uniform and ours < scaled, (ours, uniform, scaled)


@pytest.mark.parametrize('bits', BITS)
@pytest.mark.parametrize('seed', [0, 1])
def test_each_entry_is_the_nearest_grid_value_within_the_bound(bits, seed):
  rng = np.random.default_rng(10 * bits + seed)
  w = jnp.asarray(rng.standard_t(3, (40, 30)) * 0.1 + 0.3, jnp.float32)  # heavy tails
  codes_idx, mean, std = quantize(w, bits)
  q = np.asarray(fake_quantize(w, bits), np.float64)
  np.testing.assert_array_equal(q, dequantize(codes_idx, mean, std, bits))
  wn, m, s = np.asarray(w, np.float64), float(mean), float(std)
  np.testing.assert_allclose(m, wn.mean(), rtol=1e-5)
  np.testing.assert_allclose(s, wn.std(ddof=1), rtol=1e-5)  # torch's unbiased std
  codes = codebook(bits)
  grid = m + s * codes
  n = (wn - m) / (s + EPS)
  slack = EPS * (np.abs(n) + np.abs(codes).max()) + 1e-6
  error = np.abs(wn - q)
  assert np.all(error <= np.abs(wn[..., None] - grid).min(-1) + slack)  # nearest value
  inside = (n >= codes[0]) & (n <= codes[-1])
  k = np.clip(np.searchsorted(codes, n), 1, len(codes) - 1)
  half_gap = s * (codes[k] - codes[k - 1]) / 2
  assert np.all(error[inside] <= half_gap[inside] + slack[inside])
  np.testing.assert_allclose(q[n > codes[-1]], grid[-1], rtol=1e-6)  # clipped beyond
  np.testing.assert_allclose(q[n < codes[0]], grid[0], rtol=1e-6)
  assert inside.mean() < 1  # the clipped case occurred


def test_straight_through_gradients():
  n = jnp.linspace(-3, 3, 17)
  cot = jnp.arange(17.0)
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(cot * round_to_codes(x, 2)))(n),
                                cot)
  # Through the normalisation as the official autograd: with r = s / (s + eps), q the codes,
  # dL/dw_j = r (g_j - mean g) + mean g + (w_j - m) / ((N - 1) s) * sum_i g_i (q_i - r n_i).
  w = gaussian(7, (6, 5))
  g = jnp.asarray(np.random.default_rng(8).standard_normal(w.shape), jnp.float32)
  got = jax.grad(lambda x: jnp.sum(g * fake_quantize(x, 1)))(w)
  wn, gn = np.asarray(w, np.float64), np.asarray(g, np.float64)
  m, s = wn.mean(), wn.std(ddof=1)
  r, nn_ = s / (s + EPS), (wn - m) / (s + EPS)
  qn = np.asarray(round_to_codes(jnp.asarray(nn_, jnp.float32), 1), np.float64)
  want = (r * (gn - gn.mean()) + gn.mean()
          + (wn - m) / ((wn.size - 1) * s) * np.sum(gn * (qn - r * nn_)))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)
  # A constant tensor (zero-initialised) keeps its value; its gradient passes straight.
  zero = jnp.zeros((3, 4))
  np.testing.assert_array_equal(fake_quantize(zero, 1), zero)
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(g[:3, :4] * fake_quantize(x, 1)))(
      zero), g[:3, :4])


def lora_params(seed=0, size=(256, 128)):
  return {'enc': {'q': {'kernel': jax.random.normal(jax.random.key(seed), size)}}}


def trained(state, seed=3, std=0.05):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype), state)


def test_files_shrink_by_the_bit_ratio(tmp_path):
  params = lora_params()
  inner = pj.lora('kernel', rank=64)
  frozen, state = inner.init(jax.random.key(0), params)
  state = trained(state)
  entries = 256 * 64 + 64 * 128
  sizes = {32: pj.save_adapter(tmp_path / '32', inner, frozen, state).stat().st_size}
  for bits in BITS:
    path = pj.save_adapter(tmp_path / str(bits), pj.low_precision(inner, bits), frozen, state)
    tensors = safetensors.numpy.load_file(str(path))
    assert sorted(tensors) == sorted(f'state/enc/q/kernel/{leaf}/{part}' for leaf in 'ab'
                                     for part in ('codes', 'mean', 'std'))
    payload = sum(v.nbytes for v in tensors.values())
    assert payload == entries * bits // 8 + 2 * 8  # codes + (mean, std) per tensor
    sizes[bits] = path.stat().st_size
    assert payload < sizes[bits] <= payload + 128 * len(tensors)
    assert sizes[bits] <= sizes[32] * bits / 32 + 128 * len(tensors)  # 32 / k, up to headers
  assert sizes[32] / sizes[1] > 25, sizes


def test_one_bit_round_trip_is_exact_on_its_own_codes(tmp_path):
  params = lora_params(1, (24, 16))
  adapter = pj.low_precision(pj.lora('kernel', rank=4), bits=1)
  frozen, state = adapter.init(jax.random.key(1), params)
  state = trained(state)
  first = pj.save_adapter(tmp_path / 'a', adapter, frozen, state)
  _, frozen2, state2, _, _ = pj.load_adapter(tmp_path / 'a', params)
  for leaf in 'ab':
    q = state2['enc/q/kernel'][leaf]
    codes, mean, std = quantize(state['enc/q/kernel'][leaf], 1)
    np.testing.assert_array_equal(q.codes, codes)
    assert set(np.unique(q.dequantize()).tolist()) == set(
        (np.float32(codebook(1)) * std + mean).tolist())  # two values: mean -+ 0.6745 std
  second = pj.save_adapter(tmp_path / 'b', adapter, frozen2, state2)
  a, b = (safetensors.numpy.load_file(str(p)) for p in (first, second))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert first.read_bytes() == second.read_bytes()


class Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10, name='out')(jnp.tanh(nn.Dense(12, name='hidden')(x)))


@pytest.mark.parametrize('bits', [1, 4])
def test_post_training_quantisation_loads_as_the_dequantised_state(tmp_path, bits):
  x = jax.random.normal(jax.random.key(0), (5, 8))
  params = Tiny().init(jax.random.key(1), x)['params']
  inner = pj.bottleneck_adapter('^hidden$', size=6)
  frozen, state = inner.init(jax.random.key(2), params)
  state = trained(state)  # a trained full-precision adapter, quantised when saved
  wrapped = pj.low_precision(inner, bits)
  pj.save_adapter(tmp_path, wrapped, frozen, state)
  loaded, frozen2, state2, _, meta = pj.load_adapter(tmp_path, params)
  assert meta['method'] == {'method': 'low_precision', 'adapter': inner.config, 'bits': bits,
                            'leaves': None, 'init_scale': 1e-3}
  assert meta['targets']['hidden']['bits'] == bits
  entry, entry2 = state['hidden'], state2['hidden']
  for name in ('down', 'up'):  # the projections: quantised
    assert isinstance(entry2[name], Quantized)
    np.testing.assert_array_equal(dequantized(state2)['hidden'][name],
                                  fake_quantize(entry[name], bits))
    assert not np.array_equal(dequantized(state2)['hidden'][name], entry[name])
  for name in ('down_bias', 'up_bias'):  # vectors: kept exactly
    np.testing.assert_array_equal(entry2[name], entry[name])
  run = lambda a, f, s: pj.apply(Tiny(), a.apply(f, s), x)
  np.testing.assert_array_equal(run(loaded, frozen2, state2), run(wrapped, frozen, state))
  assert float(jnp.abs(run(loaded, frozen2, state2) - run(inner, frozen, state)).max()) > 1e-4


def test_init_starts_constant_tensors_as_the_official_code():
  params = lora_params(2, (32, 24))
  inner = pj.lora('kernel', rank=8)
  _, plain = inner.init(jax.random.key(5), params)
  _, state = pj.low_precision(inner, 1).init(jax.random.key(5), params)
  b = np.asarray(state['enc/q/kernel']['b'])  # LoRA's zero B: truncated N(0, 1e-3^2)
  assert np.abs(b).max() <= 2e-3 and 0.6e-3 < b.std() < 1e-3 and np.unique(b).size > 0.9 * b.size
  np.testing.assert_array_equal(state['enc/q/kernel']['a'], plain['enc/q/kernel']['a'])
  _, kept = pj.low_precision(inner, 1, init_scale=0.0).init(jax.random.key(5), params)
  np.testing.assert_array_equal(kept['enc/q/kernel']['b'], 0.0)
  # Training from either start: finite gradients; B's non-zero (A's too once B is not 0).
  for scale in (1e-3, 0.0):
    adapter = pj.low_precision(inner, 1, init_scale=scale)
    frozen, s = adapter.init(jax.random.key(5), params)
    x = jax.random.normal(jax.random.key(6), (7, 32))
    loss = lambda st: jnp.sum(jnp.sin(x @ pj.merge(adapter, frozen, st)['enc']['q']['kernel']))
    grads = jax.grad(loss)(s)['enc/q/kernel']
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    assert float(jnp.abs(grads['b']).max()) > 0
    assert (float(jnp.abs(grads['a']).max()) > 0) == (scale > 0)


def test_clear_errors():
  inner = pj.lora('kernel', rank=2)
  with pytest.raises(ValueError, match=r'bits must be one of \(1, 2, 4, 8\), got 3'):
    pj.low_precision(inner, bits=3)
  params = lora_params(0, (8, 6))
  integer = Adapter(init=lambda rng, p, calib=None: (p, {'w': jnp.zeros((3, 2), jnp.int32)}),
                    apply=lambda f, s: f, config={'method': 'counts'})
  with pytest.raises(ValueError, match="state leaf w of method 'counts' is int32"):
    pj.low_precision(integer, 1).init(jax.random.key(0), params)
  vectors = pj.svfit('kernel', rank=2)
  with pytest.raises(ValueError, match="no state leaf of two or more dimensions to quantise "
                     "in method 'svfit'"):
    pj.low_precision(vectors, 1).init(jax.random.key(0), params)
  with pytest.raises(pj.PatternError):
    pj.low_precision(inner, 1, leaves=['nothing_here']).init(jax.random.key(0), params)
  with pytest.raises(ValueError, match="method 'mask_tuning' has its own encoding"):
    pj.low_precision(pj.mask_tuning('kernel'), 1)


def test_config_round_trip_of_a_chain_inside():
  adapter = pj.low_precision(pj.chain(pj.lora('kernel', rank=2), pj.full('bias')), bits=4,
                             leaves=['^0/'])
  rebuilt = pj.from_config(adapter.config)
  assert rebuilt.config == adapter.config
  params = {'d': {'kernel': jnp.ones((4, 3)) * jnp.arange(3.0), 'bias': jnp.arange(3.0)}}
  f1, s1 = adapter.init(jax.random.key(0), params)
  f2, s2 = rebuilt.init(jax.random.key(0), params)
  jax.tree.map(np.testing.assert_array_equal, (f1, s1), (f2, s2))
  s1 = trained(s1)
  jax.tree.map(np.testing.assert_array_equal, pj.merge(adapter, f1, s1),
               pj.merge(rebuilt, f1, s1))
  # The chosen leaves (LoRA's) run quantised, the chain's `full` bias as it is.
  merged = pj.merge(adapter, f1, s1)
  np.testing.assert_array_equal(merged['d']['bias'], s1[1]['d/bias'])


@pytest.mark.long
def test_trainer_runs_and_measures_bits(tmp_path):
  from experiments.evaluate import bits_table, evaluate_bits
  from peftjax.train.loop import evaluate_adapter, train
  from tests.tiny_runs import tiny
  config = tiny('low_precision', epochs=1, max_steps=2)  # quantisation-aware training
  train(config, tmp_path / 'qat')
  tensors = safetensors.numpy.load_file(str(tmp_path / 'qat' / 'adapter' / WEIGHTS_FILE))
  assert any(k.endswith('/up/codes') and v.dtype == np.uint8 for k, v in tensors.items())
  assert evaluate_adapter(config, tmp_path / 'qat' / 'adapter')['test']['accuracy'] >= 0
  config = tiny('adapter', epochs=1, max_steps=2)
  train(config, tmp_path / 'fp')
  rows = evaluate_bits(config, tmp_path / 'fp', [4, 1], ('test',))
  assert [r['bits'] for r in rows] == [32, 4, 1]
  assert rows[0]['bytes'] > rows[1]['bytes'] > rows[2]['bytes']
  assert bits_table(rows).splitlines()[0] == '| bits | adapter file bytes | test accuracy |'
