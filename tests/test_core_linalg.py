"""Truncated and randomised SVD, Kronecker-product SVD, rank selection and LDU."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.core import linalg


def normal(seed, *shape):
  """Numpy draws (no per-shape compilation), as float32 jax arrays."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def decaying(seed, m=40, n=28, decay=0.7):
  """A random matrix with singular values decay^k."""
  q1, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((m, n)))
  q2, _ = np.linalg.qr(np.random.default_rng(seed + 100).standard_normal((n, n)))
  return jnp.asarray((q1 * decay ** np.arange(n)) @ q2.T, jnp.float32)


def projector_gap(u1, u2):
  """Spectral distance between the subspaces spanned (sine of the largest principal angle)."""
  return float(jnp.linalg.norm(u1 @ u1.T - u2 @ u2.T, 2))


@pytest.mark.parametrize('shape', [(24, 16), (16, 24)])
def test_truncated_svd_top_and_bottom(shape):
  w = normal(0, *shape)
  u, s, vt = linalg.svd(w)
  np.testing.assert_allclose((u * s) @ vt, w, atol=1e-5)
  assert np.all(np.diff(np.asarray(s)) <= 0)
  ut, st, vtt = linalg.svd_top(w, 3)
  ub, sb, vtb = linalg.svd_bottom(w, 5)
  assert ut.shape == (shape[0], 3) and vtt.shape == (3, shape[1]) and sb.shape == (5,)
  np.testing.assert_allclose(st, s[:3]), np.testing.assert_allclose(sb, s[-5:])
  np.testing.assert_allclose(ut.T @ ut, np.eye(3), atol=1e-5)
  np.testing.assert_allclose(vtb @ vtb.T, np.eye(5), atol=1e-5)
  # canonical signs: the largest-magnitude entry of each left vector is positive
  assert np.all(np.asarray(ut)[np.argmax(np.abs(ut), 0), np.arange(3)] > 0)
  # recomputation (as on adapter load) is bit-identical
  jax.tree.map(np.testing.assert_array_equal, linalg.svd_top(w, 3), (ut, st, vtt))
  for bad in (0, 17):
    with pytest.raises(ValueError, match=r'rank .* must be in \[1, 16\]'):
      linalg.svd_top(w, bad)


@pytest.mark.parametrize('seed', [1, 2])
def test_randomized_svd_matches_the_exact_top_subspace(seed):
  w = decaying(seed)
  u, s, vt = linalg.svd_top(w, 5)
  gaps = []
  for niter in (0, 1, 3):
    ur, sr, vtr = linalg.randomized_svd(jax.random.key(seed), w, 5, niter=niter, oversample=5)
    assert ur.shape == (40, 5) and sr.shape == (5,) and vtr.shape == (5, 28)
    np.testing.assert_allclose(ur.T @ ur, np.eye(5), atol=1e-5)
    gaps.append(projector_gap(ur, u) + projector_gap(vtr.T, vt.T))
    np.testing.assert_allclose(sr, s, rtol=1e-2 if niter else 5e-2)
  assert gaps[-1] < 1e-3 and gaps[-1] <= gaps[0]
  ur, sr, vtr = linalg.randomized_svd(jax.random.key(seed), w, 5, niter=3, oversample=5)
  np.testing.assert_allclose(ur, u, atol=1e-3)  # same canonical signs as the exact SVD
  np.testing.assert_allclose((ur * sr) @ vtr, (u * s) @ vt, atol=1e-4)
  again = linalg.randomized_svd(jax.random.key(seed), w, 5, niter=3, oversample=5)
  jax.tree.map(np.testing.assert_array_equal, again, (ur, sr, vtr))


def test_kpsvd_is_exact_at_full_kronecker_rank_and_optimal_when_truncated():
  w = normal(3, 24, 16)  # (4*6, 4*4)
  a, s, b = linalg.kpsvd(w, (4, 4))
  assert a.shape == (16, 4, 4) and b.shape == (16, 6, 4) and s.shape == (16,)
  np.testing.assert_allclose(linalg.kron_sum(a * s[:, None, None], b), w, atol=1e-5)
  np.testing.assert_allclose(jnp.einsum('kij,lij->kl', a, a), np.eye(16), atol=1e-5)
  np.testing.assert_allclose(jnp.einsum('kij,lij->kl', b, b), np.eye(16), atol=1e-5)
  np.testing.assert_allclose(linalg.kron_sum(a[:1], b[:1]), jnp.kron(a[0], b[0]), atol=1e-6)
  # truncation error = energy of the dropped components (Eckart-Young on the rearrangement)
  for r in (1, 5):
    err = jnp.sum((w - linalg.kron_sum(a[:r] * s[:r, None, None], b[:r])) ** 2)
    np.testing.assert_allclose(err, jnp.sum(s[r:] ** 2), rtol=1e-4)
  # a true sum of two Kronecker products is recovered with exactly two components
  x = (jnp.kron(normal(40, 3, 5), normal(41, 4, 2)) + jnp.kron(normal(42, 3, 5), normal(43, 4, 2)))
  a, s, b = linalg.kpsvd(x, (3, 5))
  assert float(s[2]) < 1e-4 * float(s[0])
  np.testing.assert_allclose(linalg.kron_sum(a[:2] * s[:2, None, None], b[:2]), x, atol=1e-4)
  with pytest.raises(ValueError, match=r'\(5, 4\) does not divide \(24, 16\)'):
    linalg.kpsvd(w, (5, 4))


def test_energy_and_elbow_rank_selection():
  s = np.array([4.0, 2.0, 1.0, 1.0, 0.5])  # energies 16, 4, 1, 1, .25 of 22.25
  cum = linalg.energy(s)
  np.testing.assert_allclose(cum, np.cumsum(s ** 2) / 22.25)
  assert linalg.energy_rank(s, 0.7) == 1 and linalg.energy_rank(s, 16 / 22.25) == 1
  assert linalg.energy_rank(s, 0.75) == 2 and linalg.energy_rank(s, 0.9) == 3
  assert linalg.energy_rank(s, 20 / 22.25) == 2 and linalg.energy_rank(s, 0.95) == 4
  assert linalg.energy_rank(s, 1.0) == 5
  assert linalg.energy_rank(np.zeros(3), 0.9) == 1
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match='energy threshold'):
      linalg.energy_rank(s, bad)
  assert linalg.elbow_rank([10.0, 9.5, 9.0, 1.0, 0.9, 0.8]) == 3
  assert linalg.elbow_rank([0.8, 10.0, 1.0, 9.0, 0.9, 9.5]) == 3  # sorts first
  assert linalg.elbow_rank([10.0, 1.0, 0.9, 0.8, 0.7]) == 1
  assert linalg.elbow_rank([10.0, 9.9, 9.8, 0.0]) == 3  # concave: keep through the knee
  assert linalg.elbow_rank(0.5 ** np.arange(12)) == 3  # 1 - k/11 - 2^-k peaks at k = 3
  assert linalg.elbow_rank(np.linspace(10, 1, 20)) == 20  # no elbow: keep all
  assert linalg.elbow_rank([3.0, 3.0, 3.0]) == 3 and linalg.elbow_rank([2.0]) == 1
  assert linalg.kron_shape(24) == (4, 6) and linalg.kron_shape(7) == (1, 7)
  assert linalg.kron_shape(768) == (24, 32) and linalg.kron_shape(64) == (8, 8)


@pytest.mark.parametrize('shape', [(16, 16), (24, 16), (16, 24)])
def test_ldu_reconstructs_with_unit_triangular_factors(shape):
  w = normal(5, *shape)
  p, l, d, u = linalg.ldu(w)
  k = min(shape)
  assert p.shape == (shape[0],) * 2 and l.shape == (shape[0], k) and u.shape == (k, shape[1])
  np.testing.assert_allclose(p @ l @ jnp.diag(d) @ u, w, atol=1e-5)
  np.testing.assert_allclose(jnp.diagonal(l), 1.0), np.testing.assert_allclose(jnp.diagonal(u), 1)
  np.testing.assert_array_equal(jnp.triu(l[:k], 1), 0)
  np.testing.assert_array_equal(jnp.tril(u[:, :k], -1), 0)
  np.testing.assert_array_equal(p @ p.T, np.eye(shape[0]))
  assert float(jnp.abs(l).max()) <= 1.0 + 1e-6  # partial pivoting bounds the multipliers
