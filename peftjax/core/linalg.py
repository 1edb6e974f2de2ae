"""Matrix factorisations for SVD-, LDU- and Kronecker-initialised methods.

- `svd_top` / `svd_bottom`: exact truncated SVD triplets (largest / smallest r).
- `randomized_svd`: Halko, Martinsson & Tropp, "Finding Structure with Randomness" (2011):
  a Gaussian sketch, `niter` subspace (power) iterations with re-orthonormalisation, and
  `oversample` extra columns; the fast SVD of PiSSA.
- `kpsvd`: the Kronecker-product SVD of Van Loan & Pitsianis, "Approximation with Kronecker
  Products" (1993): W (m1*m2, n1*n2) = sum_k s_k A_k (x) B_k from the SVD of a rearrangement.
- `energy_rank` / `elbow_rank`: rank selection from a spectrum.
- `ldu`: W = P L diag(D) U with partial pivoting (LoLDU).

Singular vectors have a canonical sign (the largest-magnitude entry of each left vector is
positive), so a factorisation recomputed from the same weight matches, even across backends.
All factorisations run in float32 (or wider) whatever the input dtype.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _f32(w):
  w = jnp.asarray(w)
  return w if jnp.finfo(w.dtype).bits >= 32 else w.astype(jnp.float32)


def _check_rank(w, rank: int, limit: int | None = None):
  limit = min(w.shape) if limit is None else limit
  if w.ndim != 2:
    raise ValueError(f'expected a matrix, got shape {tuple(w.shape)}')
  if not 0 < rank <= limit:
    raise ValueError(f'rank {rank} must be in [1, {limit}] for shape {tuple(w.shape)}')


def canonical_signs(u, s, vt):
  """Flips each triplet so that the largest-magnitude entry of `u[:, k]` is positive."""
  idx = jnp.argmax(jnp.abs(u), axis=0)
  sign = jnp.sign(u[idx, jnp.arange(u.shape[1])])
  sign = jnp.where(sign == 0, 1, sign).astype(u.dtype)
  return u * sign, s, vt * sign[:, None]


def svd(w):
  """Thin SVD `w = u @ diag(s) @ vt`, singular values descending, canonical signs."""
  u, s, vt = jnp.linalg.svd(_f32(w), full_matrices=False)
  return canonical_signs(u, s, vt)


def svd_top(w, rank: int):
  """The `rank` largest singular triplets: u (m, r), s (r,), vt (r, n)."""
  _check_rank(w, rank)
  u, s, vt = svd(w)
  return u[:, :rank], s[:rank], vt[:rank]


def svd_bottom(w, rank: int):
  """The `rank` smallest triplets of the thin SVD (still in descending order)."""
  _check_rank(w, rank)
  u, s, vt = svd(w)
  return u[:, -rank:], s[-rank:], vt[-rank:]


def randomized_svd(key, w, rank: int, *, niter: int = 2, oversample: int = 10):
  """Approximate top-`rank` SVD (Halko et al., 2011, Algorithms 4.4 and 5.1).

  Sketches the range of `w` with `rank + oversample` Gaussian probes, refines it with `niter`
  subspace iterations (each re-orthonormalised by QR), then takes the exact SVD of the small
  projected matrix. The error decays like (s_{k+1} / s_r)^(2 niter + 1).
  """
  _check_rank(w, rank)
  if niter < 0 or oversample < 0:
    raise ValueError(f'niter and oversample must be >= 0, got {niter}, {oversample}')
  w = _f32(w)
  m, n = w.shape
  k = min(rank + oversample, m, n)
  q, _ = jnp.linalg.qr(w @ jax.random.normal(key, (n, k), w.dtype))
  for _ in range(niter):
    q, _ = jnp.linalg.qr(w.T @ q)
    q, _ = jnp.linalg.qr(w @ q)
  ub, s, vt = jnp.linalg.svd(q.T @ w, full_matrices=False)
  u, s, vt = canonical_signs(q @ ub, s, vt)
  return u[:, :rank], s[:rank], vt[:rank]


def energy(s) -> np.ndarray:
  """Cumulative energy `e[k-1] = sum_{i<k} s_i^2 / sum_i s_i^2` (1 for a zero spectrum)."""
  e = np.asarray(s, np.float64) ** 2
  total = e.sum()
  return np.cumsum(e) / total if total > 0 else np.ones_like(e)


def energy_rank(s, threshold: float) -> int:
  """The smallest k whose top-k components hold at least `threshold` of the energy."""
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f'energy threshold must be in (0, 1], got {threshold}')
  cum = energy(s)
  return int(min(np.searchsorted(cum, threshold - 1e-12) + 1, len(cum)))


def elbow_rank(s) -> int:
  """The number of components up to the elbow of the sorted (descending) spectrum.

  On the normalised curve (k / (n-1), (s_k - s_min) / (s_max - s_min)) the elbow is the point
  farthest from the chord joining its ends ("Kneedle"). A convex spectrum (the usual case)
  bends below the chord: the elbow is the first point of the flat tail, and the components
  before it are kept. A concave one bends above it: the elbow is the last point before the
  drop, and is kept. A spectrum without an elbow (flat, linear, or under 3 points) keeps all.
  """
  s = np.sort(np.asarray(s, np.float64))[::-1]
  n = len(s)
  if n <= 2 or s[0] == s[-1]:
    return n
  x = np.arange(n) / (n - 1)
  below = (1.0 - x) - (s - s[-1]) / (s[0] - s[-1])  # the chord is y = 1 - x
  if np.abs(below).max() < 1e-6:
    return n
  if below.max() >= -below.min():
    return max(int(np.argmax(below)), 1)
  return int(np.argmin(below)) + 1


def kron_shape(d: int) -> tuple[int, int]:
  """`(d1, d2)` with `d1 * d2 = d`, `d1 <= d2` and `d1` the largest divisor <= sqrt(d)."""
  d1 = max(k for k in range(1, math.isqrt(d) + 1) if d % k == 0)
  return d1, d // d1


def _rearrange(w, a_shape):
  (m, n), (m1, n1) = w.shape, tuple(a_shape)
  if m1 <= 0 or n1 <= 0 or m % m1 or n % n1:
    raise ValueError(f'Kronecker factor shape {tuple(a_shape)} does not divide {tuple(w.shape)}')
  m2, n2 = m // m1, n // n1
  return w.reshape(m1, m2, n1, n2).transpose(0, 2, 1, 3).reshape(m1 * n1, m2 * n2), (m2, n2)


def kpsvd(w, a_shape):
  """Kronecker-product SVD: `w = sum_k s[k] * kron(a[k], b[k])`.

  Args:
    w: (m1*m2, n1*n2).
    a_shape: (m1, n1), the shape of the first factors; the second are (m2, n2).
  Returns:
    a (K, m1, n1) and b (K, m2, n2) with unit Frobenius norms, and s (K,) descending,
      K = min(m1 n1, m2 n2) (the full Kronecker rank: the sum over all K is exact).
  """
  r, (m2, n2) = _rearrange(_f32(w), a_shape)
  u, s, vt = svd(r)
  return u.T.reshape(-1, *tuple(a_shape)), s, vt.reshape(-1, m2, n2)


def kron_sum(a, b):
  """`sum_k kron(a[k], b[k])` for a (K, m1, n1) and b (K, m2, n2): a (m1*m2, n1*n2) matrix."""
  (_, m1, n1), (_, m2, n2) = a.shape, b.shape
  return jnp.einsum('kac,kbd->abcd', a, b).reshape(m1 * m2, n1 * n2)


def ldu(w):
  """LDU with partial pivoting: `w = p @ l @ diag(d) @ u`.

  For w (m, n) and k = min(m, n): p (m, m) a permutation, l (m, k) unit lower triangular,
  d (k,) the pivots, u (k, n) unit upper triangular. A zero pivot leaves its row of `u`
  unnormalised (then `p l diag(d) u` drops that row's contribution; it is exact otherwise).
  """
  p, l, u = jax.scipy.linalg.lu(_f32(w))
  d = jnp.diagonal(u)
  return p, l, d, u / jnp.where(d == 0, 1, d)[:, None]
