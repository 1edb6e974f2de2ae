"""Structured leaves: small pytrees that stand in for a weight inside a param tree.

`apply` may return a tree whose kernels are structured leaves instead of dense arrays:
`LowRank` (w + a @ b * scale), `SparseDelta` (w plus values at selected entries, rows or
columns) or `Scaled` (w with its rows or columns multiplied by a vector). `dense` computes
`x @ leaf` from the parts, without forming the full weight, so the backward pass never builds
a full-size weight gradient (`peftjax.core.linen` runs it inside any model's `flax.linen`
layers). `materialize` turns any tree back into plain arrays.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from peftjax.core.dropout import dropout


class _OnWeight:
  """What every structured leaf shares: the weight `w`'s shape, dtype and rank, and
  unflattening from (children, aux) in constructor order."""

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


@jax.tree_util.register_pytree_with_keys_class
class LowRank(_OnWeight):
  """The weight `w + (a @ b) * scale`; `dropout` is applied to the input of the `a @ b` path.

  `w` is (in, out) or another leaf, `a` is (in, r), `b` is (r, out). `dense` computes
  `x @ w + (x @ a) @ b * scale` without forming the full-size weight or its gradient: what
  LoRA and the methods built on it (`methods.low_rank`) return from `apply`.

  Example:
    >>> import numpy as np, peftjax as pj
    >>> leaf = pj.LowRank(np.eye(3, dtype=np.float32), np.ones((3, 1), np.float32),
    ...                     np.ones((1, 3), np.float32), 0.5)
    >>> pj.materialize(leaf)[0]
    Array([1.5, 0.5, 0.5], dtype=float32)
  """

  def __init__(self, w, a, b, scale: float, dropout: float = 0.0):
    self.w, self.a, self.b = w, a, b
    self.scale, self.dropout = float(scale), float(dropout)

  def tree_flatten(self):
    return (self.w, self.a, self.b), (self.scale, self.dropout)

  def tree_flatten_with_keys(self):  # key paths end in w / a / b (used by sharding rules)
    keys = map(jax.tree_util.GetAttrKey, ('w', 'a', 'b'))
    return tuple(zip(keys, (self.w, self.a, self.b))), (self.scale, self.dropout)

  def delta(self):
    return (self.a @ self.b) * jnp.asarray(self.scale, self.a.dtype)

  def __repr__(self):
    return (f'LowRank(w={_describe(self.w)}, r={self.a.shape[-1]}, scale={self.scale:g}, '
            f'dropout={self.dropout:g})')


@jax.tree_util.register_pytree_with_keys_class
class SparseDelta(_OnWeight):
  """The weight `w + D`, where D is zero except at the entries `index` selects, which hold
  `values`. `axis` says what the sorted, unique `index` selects in the (in, out) weight:

  - None: single entries by flat index `row * out + col`; `values` is (k,);
  - 0: whole rows (input features); `values` is (k, out);
  - 1: whole columns (output features); `values` is (in, k).

  `dense` computes `x @ w` plus the selected part only, so the gradient of `values` is all
  the weight gradient there is: (k, out) / (in, k) products for rows and columns; for single
  entries a gather-scatter of O(tokens * k) while tokens * k < in * out (`gathers`), else
  the delta is formed densely (one full-size weight and its gradient, as in full
  fine-tuning).
  """

  def __init__(self, w, index, values, axis: int | None = None):
    if axis not in (None, 0, 1):
      raise ValueError(f'SparseDelta axis must be None (entries), 0 (rows) or 1 (columns), '
                       f'got {axis!r}')
    self.w, self.index, self.values, self.axis = w, index, values, axis

  def tree_flatten(self):
    return (self.w, self.index, self.values), (self.axis,)

  def tree_flatten_with_keys(self):  # key paths end in w / index / values (sharding rules)
    keys = map(jax.tree_util.GetAttrKey, ('w', 'index', 'values'))
    return tuple(zip(keys, (self.w, self.index, self.values))), (self.axis,)

  def delta(self):
    """D as a dense array of `w`'s shape."""
    zeros = jnp.zeros(self.shape, self.values.dtype)
    if self.axis is None:
      return zeros.reshape(-1).at[self.index].set(self.values).reshape(self.shape)
    if self.axis == 0:
      return zeros.at[self.index].set(self.values)
    return zeros.at[:, self.index].set(self.values)

  def __repr__(self):
    what = {None: 'entries', 0: 'rows', 1: 'columns'}[self.axis]
    return f'SparseDelta(w={_describe(self.w)}, {self.index.shape[0]} {what})'


@jax.tree_util.register_pytree_with_keys_class
class Scaled(_OnWeight):
  """The weight `w` with its rows (`axis` 0: input features) or columns (`axis` 1: output
  features) multiplied by the vector `scale` (SSF, (IA)³).

  `dense` computes `(x * scale) @ w` or `(x @ w) * scale`: the gradient of `scale` is a
  reduction over the tokens of a product the forward pass forms anyway, with no full-size
  weight gradient (forming `w * scale` in the loss makes the backward pass compute one).
  """

  def __init__(self, w, scale, axis: int = 1):
    if axis not in (0, 1):
      raise ValueError(f'Scaled axis must be 0 (rows) or 1 (columns), got {axis!r}')
    self.w, self.scale, self.axis = w, scale, axis

  def tree_flatten(self):
    return (self.w, self.scale), (self.axis,)

  def tree_flatten_with_keys(self):  # key paths end in w / scale (sharding rules)
    keys = map(jax.tree_util.GetAttrKey, ('w', 'scale'))
    return tuple(zip(keys, (self.w, self.scale))), (self.axis,)

  def factor(self):
    """`scale` shaped to multiply `w` (a column for rows, a row for columns)."""
    return self.scale[:, None] if self.axis == 0 else self.scale[None, :]

  def __repr__(self):
    return f'Scaled(w={_describe(self.w)}, {("rows", "columns")[self.axis]})'


STRUCTURED = (LowRank, SparseDelta, Scaled)


def is_structured(x: Any) -> bool:
  return isinstance(x, STRUCTURED)


def materialize(tree):
  """Evaluates every structured leaf of `tree` into a plain array (dropout is not applied).

  Args:
    tree: any param tree, possibly holding `LowRank`, `SparseDelta` or `Scaled` leaves.

  Returns:
    The same tree with plain arrays in their place (other leaves unchanged). `merge` is
      `materialize(adapter.apply(frozen, state))` for methods that insert no modules.
  """
  return jax.tree.map(_to_array, tree, is_leaf=is_structured)


def _to_array(x):
  if isinstance(x, (LowRank, SparseDelta)):
    return _to_array(x.w) + x.delta().astype(x.dtype)
  if isinstance(x, Scaled):
    return _to_array(x.w) * x.factor().astype(x.dtype)
  return x


def dense(x, kernel, rng=None):
  """`x @ kernel` for a plain or structured kernel; `rng` enables adapter dropout (training).

  The matmul for layers of your own (the stock `flax.linen` layers call it inside
  `structured_layers`). Leading axes are folded into one first: XLA:CPU differentiates 2-D
  products with far less data movement than batched ones.

  Args:
    x: [..., in] inputs.
    kernel: an (in, out) array or a `LowRank`, `SparseDelta` or `Scaled` leaf.
    rng: a PRNG key for the leaf's dropout (training only); None: no dropout.

  Returns:
    [..., out] outputs.

  Example:
    >>> import numpy as np, peftjax as pj
    >>> leaf = pj.LowRank(np.eye(3, dtype=np.float32), np.ones((3, 1), np.float32),
    ...                     np.ones((1, 3), np.float32), 0.5)
    >>> pj.dense(np.ones((2, 3)), leaf).shape
    (2, 3)
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
  if isinstance(kernel, SparseDelta):
    if kernel.axis is None and not gathers(x.shape[0], kernel) and not is_structured(kernel.w):
      return x @ (kernel.w + kernel.delta()).astype(x.dtype)  # one product, as full FT's
    return _dense2d(x, kernel.w, rng) + _sparse_path(x, kernel)
  if isinstance(kernel, Scaled):
    scale = kernel.scale.astype(x.dtype)
    if kernel.axis == 0:
      return _dense2d(x * scale, kernel.w, rng)
    return _dense2d(x, kernel.w, rng) * scale
  return x @ kernel.astype(x.dtype)


def gathers(tokens: int, kernel: 'SparseDelta') -> bool:
  """Whether `tokens` rows through single entries take the gather-scatter path: while its
  (tokens, k) products are fewer than the weight's entries. Above that, forming D densely
  is cheaper (measured on MiniLM's 2,048-token batches: a 0.5% selection 1.3x and a 4% one
  3.8x faster dense)."""
  d_in, d_out = kernel.shape
  return tokens * kernel.index.shape[0] < d_in * d_out


def _sparse_path(x, kernel: SparseDelta):
  """`x @ D` for 2-D `x` from the selected entries of D alone."""
  values, index = kernel.values.astype(x.dtype), kernel.index
  n, (d_in, d_out) = x.shape[0], kernel.shape
  if kernel.axis == 0:
    return jnp.take(x, index, axis=1) @ values
  if kernel.axis == 1:
    return jnp.zeros((n, d_out), x.dtype).at[:, index].set(x @ values)
  if not gathers(n, kernel):
    return x @ kernel.delta().astype(x.dtype)
  rows, cols = index // d_out, index % d_out
  return jnp.zeros((n, d_out), x.dtype).at[:, cols].add(jnp.take(x, rows, axis=1) * values)


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
