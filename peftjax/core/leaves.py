"""Structured leaves: small pytrees that stand in for a weight inside a param tree.

`apply` may return a tree whose kernels are `LowRank` leaves instead of dense arrays. The
bundled models' dense ops call `dense`, which computes `x @ w + dropout(x) @ a @ b * scale`
without forming `w + a @ b * scale`, so the backward pass never builds a full-size weight
gradient. `materialize` turns any tree back into plain arrays for third-party models.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from peftjax.core.dropout import dropout


@jax.tree_util.register_pytree_with_keys_class
class LowRank:
  """The weight `w + (a @ b) * scale`; `dropout` is applied to the input of the `a @ b` path.

  `w` is (in, out) or another leaf, `a` is (in, r), `b` is (r, out).
  """

  def __init__(self, w, a, b, scale: float, dropout: float = 0.0):
    self.w, self.a, self.b = w, a, b
    self.scale, self.dropout = float(scale), float(dropout)

  def tree_flatten(self):
    return (self.w, self.a, self.b), (self.scale, self.dropout)

  def tree_flatten_with_keys(self):  # key paths end in w / a / b (used by sharding rules)
    keys = map(jax.tree_util.GetAttrKey, ('w', 'a', 'b'))
    return tuple(zip(keys, (self.w, self.a, self.b))), (self.scale, self.dropout)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def shape(self):
    return self.w.shape

  @property
  def dtype(self):
    return self.w.dtype

  @property
  def ndim(self):
    return len(self.w.shape)

  def delta(self):
    return (self.a @ self.b) * jnp.asarray(self.scale, self.a.dtype)

  def __repr__(self):
    return (f'LowRank(w={_describe(self.w)}, r={self.a.shape[-1]}, scale={self.scale:g}, '
            f'dropout={self.dropout:g})')


STRUCTURED = (LowRank,)


def is_structured(x: Any) -> bool:
  return isinstance(x, STRUCTURED)


def materialize(tree):
  """Evaluates every structured leaf of `tree` into a plain array (dropout is not applied)."""
  return jax.tree.map(_to_array, tree, is_leaf=is_structured)


def _to_array(x):
  if isinstance(x, LowRank):
    return _to_array(x.w) + x.delta().astype(x.dtype)
  return x


def dense(x, kernel, rng=None):
  """`x @ kernel` for a plain or structured kernel; `rng` enables adapter dropout (training).

  Leading axes are folded into one first: XLA:CPU differentiates 2-D products with far less
  data movement than batched ones (the rank-r weight gradients became ~2x cheaper).
  """
  lead = x.shape[:-1]
  y = _dense2d(x.reshape(-1, x.shape[-1]), kernel, rng)
  return y.reshape(*lead, y.shape[-1])


def _dense2d(x, kernel, rng):
  if isinstance(kernel, LowRank):
    y = _dense2d(x, kernel.w, None if rng is None else jax.random.fold_in(rng, 0))
    h = dropout(None if rng is None else jax.random.fold_in(rng, 1), x, kernel.dropout)
    return y + _low_rank_path(h, kernel.a.astype(h.dtype), kernel.b.astype(h.dtype),
                              kernel.scale)
  return x @ kernel.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _low_rank_path(h, a, b, scale):
  """`(h @ a) @ b * scale` for 2-D `h`, with a backward pass laid out for speed."""
  return ((h @ a) @ b) * scale


def _low_rank_path_fwd(h, a, b, scale):
  u = h @ a
  return (u @ b) * scale, (h, a, b, u)


def _low_rank_path_bwd(scale, residuals, g):
  h, a, b, u = residuals
  du = (g @ b.T) * scale
  # dA = h.T @ du, computed as (du.T @ h).T: XLA:CPU contracts the long token axis ~10x
  # faster into a (r, in) result than into (in, r); the barrier keeps XLA from rewriting
  # the small transpose back into the slow product.
  da = jax.lax.optimization_barrier(du.T @ h).T
  return du @ a.T, da, (u.T @ g) * scale


def _describe(x):
  return f'{type(x).__name__}{tuple(x.shape)}' if hasattr(x, 'shape') else repr(x)


_low_rank_path.defvjp(_low_rank_path_fwd, _low_rank_path_bwd)
