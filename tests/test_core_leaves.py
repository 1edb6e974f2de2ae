"""`leaves.dense` and its hand-written VJP against plain jnp autodiff, for every structured leaf.

The references never call `dense`: without dropout the kernel is materialised
(`x @ materialize(leaf)`); with dropout the adapter path is written out with
`peftjax.core.dropout.dropout` and the key derivation `dense` uses (the base weight draws
from `fold_in(rng, 0)`, the adapter's input mask from `fold_in(rng, 1)`).
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.core import leaves
from peftjax.core.dropout import dropout
from peftjax.core.leaves import LowRank, Scaled, SparseDelta, dense, materialize

D_IN, D_OUT = 7, 6


def normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def low_rank(rng, rate, dtype, inner=None):
  w = normal(rng, D_IN, D_OUT) if inner is None else inner
  return LowRank(w.astype(dtype) if inner is None else w, normal(rng, D_IN, 3).astype(dtype),
                 normal(rng, 3, D_OUT).astype(dtype), 1.7, rate)


def sparse(rng, axis, k, dtype, inner=None):
  """A `SparseDelta` over a random w selecting k random entries / rows / columns."""
  w = normal(rng, D_IN, D_OUT).astype(dtype) if inner is None else inner
  size = D_IN * D_OUT if axis is None else (D_IN, D_OUT)[axis]
  index = jnp.asarray(np.sort(rng.choice(size, k, replace=False)), jnp.int32)
  shape = {None: (k,), 0: (k, D_OUT), 1: (D_IN, k)}[axis]
  return SparseDelta(w, index, normal(rng, *shape).astype(dtype), axis)


def scaled(rng, axis, dtype, inner=None):
  """A `Scaled` over a random w, its rows (axis 0) or columns (axis 1) times a random vector."""
  w = normal(rng, D_IN, D_OUT).astype(dtype) if inner is None else inner
  return Scaled(w, normal(rng, (D_IN, D_OUT)[axis]).astype(dtype), axis)


# Every structured leaf type with a factory of a random instance: (numpy rng, dropout rate,
# dtype) -> leaf. A new type in `leaves.STRUCTURED` must be added here (see the test below).
FACTORIES = {LowRank: low_rank, SparseDelta: lambda rng, rate, dtype: sparse(rng, None, 2, dtype),
             Scaled: lambda rng, rate, dtype: scaled(rng, 1, dtype)}
KINDS = {
    # single entries: 2 of 42 take the gather-scatter path; 9 too for one token, and form D
    # for 10 tokens (`leaves.gathers`: tokens * k < 42)
    'entries': lambda rng, rate, dtype: sparse(rng, None, 2, dtype),
    'entries_dense': lambda rng, rate, dtype: sparse(rng, None, 9, dtype),
    'rows': lambda rng, rate, dtype: sparse(rng, 0, 3, dtype),
    'columns': lambda rng, rate, dtype: sparse(rng, 1, 2, dtype),
    'sparse_over_lowrank': lambda rng, rate, dtype: sparse(rng, 0, 2, dtype,
                                                          inner=low_rank(rng, rate, dtype)),
    'lowrank': lambda rng, rate, dtype: low_rank(rng, rate, dtype),
    'scaled_rows': lambda rng, rate, dtype: scaled(rng, 0, dtype),
    'scaled_columns': lambda rng, rate, dtype: scaled(rng, 1, dtype),
    # SSF / (IA)³ chained with LoRA, in either order.
    'scaled_over_lowrank': lambda rng, rate, dtype: scaled(rng, 0, dtype,
                                                          inner=low_rank(rng, rate, dtype)),
    'lowrank_over_scaled': lambda rng, rate, dtype: low_rank(rng, rate, dtype,
                                                            inner=scaled(rng, 1, dtype)),
    # `_dense2d` recurses into a structured `w`: the inner adapter has its own scale and mask.
    'nested': lambda rng, rate, dtype: low_rank(rng, rate, dtype, inner=LowRank(
        normal(rng, D_IN, D_OUT).astype(dtype), normal(rng, D_IN, 2).astype(dtype),
        normal(rng, 2, D_OUT).astype(dtype), 0.6, rate)),
}


def test_every_structured_leaf_type_has_a_factory():
  assert set(FACTORIES) == set(leaves.STRUCTURED)
  rng = np.random.default_rng(0)
  for kind, make in FACTORIES.items():
    leaf = make(rng, 0.0, jnp.float32)
    assert type(leaf) is kind and leaves.is_structured(leaf)
    assert leaf.shape == (D_IN, D_OUT)


def reference(x, kernel, rng):
  """`x @ kernel` written out in plain jnp, with `dense`'s dropout masks."""
  if isinstance(kernel, LowRank):
    y = reference(x, kernel.w, None if rng is None else jax.random.fold_in(rng, 0))
    h = dropout(None if rng is None else jax.random.fold_in(rng, 1), x, kernel.dropout)
    return y + h @ kernel.a.astype(x.dtype) @ kernel.b.astype(x.dtype) * kernel.scale
  if isinstance(kernel, SparseDelta):
    return reference(x, kernel.w, rng) + x @ kernel.delta().astype(x.dtype)
  if isinstance(kernel, Scaled):  # the scale on the input features (rows) or the outputs
    scale = kernel.scale.astype(x.dtype)
    if kernel.axis == 0:
      return reference(x * scale, kernel.w, rng)
    return reference(x, kernel.w, rng) * scale
  assert not leaves.is_structured(kernel), f'no reference for {type(kernel).__name__}'
  return x @ kernel.astype(x.dtype)


def assert_close(got, want, tol, what):
  """max |got - want| <= tol * max |want| (entries near 0 get the scale of the whole array)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, what
  err, size = np.abs(got - want).max(), np.abs(want).max()
  assert size > 0 and err <= tol * size, f'{what}: max error {err:.3g} vs max {size:.3g}'


def vjp_all(f, x, kernel, g):
  """The output and the cotangents of x and of every array in `kernel`."""
  y, pull = jax.vjp(f, x, kernel)
  dx, dk = pull(g.astype(y.dtype))
  return y, dx, [(p, d) for p, d in jax.tree_util.tree_leaves_with_path(dk)
                 if d.dtype != jax.dtypes.float0]  # integer index arrays have no cotangent


# SparseDelta and Scaled have no dropout of their own
NO_DROPOUT = {'entries', 'entries_dense', 'rows', 'columns', 'scaled_rows', 'scaled_columns'}


@pytest.mark.parametrize('lead', [(), (2, 5)], ids=['1d', 'batched'])
@pytest.mark.parametrize('kind,rate', [(k, r) for k in KINDS for r in (0.0, 0.4)
                                       if not (r and k in NO_DROPOUT)])
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)],
                         ids=['f32', 'bf16'])
def test_dense_value_and_gradients_match_plain_autodiff(kind, rate, lead, dtype, tol):
  rng = np.random.default_rng(zlib.crc32(repr((kind, rate, lead)).encode()))
  kernel = KINDS[kind](rng, rate, dtype)
  x = normal(rng, *lead, D_IN).astype(dtype)
  g = normal(rng, *lead, D_OUT)
  key = jax.random.key(int(rng.integers(2**31)))
  got = vjp_all(lambda x, k: dense(x, k, key), x, kernel, g)
  assert got[0].dtype == got[1].dtype == dtype and got[0].shape == (*lead, D_OUT)
  if rate == 0.0:
    plain = lambda x, k: x @ materialize(k)
    # without a key there is no dropout whatever the leaf's rate
    np.testing.assert_array_equal(dense(x, kernel), got[0])
  else:
    plain = lambda x, k: reference(x, k, key)
    assert float(jnp.abs(dense(x, kernel) - got[0]).max()) > 1e-2  # the masks are on
  # the reference in float32 (for bf16: on the same rounded values)
  f32 = lambda t: jax.tree.map(
      lambda v: v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v, t)
  want = vjp_all(plain, f32(x), f32(kernel), g)
  assert_close(got[0], want[0], tol, 'output')
  assert_close(got[1], want[1], tol, 'dx')
  assert [p for p, _ in got[2]] == [p for p, _ in want[2]]
  for (path, d_got), (_, d_want) in zip(got[2], want[2]):
    assert d_got.dtype == dtype
    assert_close(d_got, d_want, tol, f'd{jax.tree_util.keystr(path)}')


def test_dropout_masks_only_the_adapter_input():
  """With w = 0 the output is exactly the adapter path on the masked input."""
  rng = np.random.default_rng(3)
  leaf = LowRank(jnp.zeros((D_IN, D_OUT)), normal(rng, D_IN, 3), normal(rng, 3, D_OUT), 2.5, 0.5)
  x = normal(rng, 2, 5, D_IN)
  key = jax.random.key(11)
  h = dropout(jax.random.fold_in(key, 1), x, 0.5)
  assert 0.3 < float(jnp.mean(h == 0)) < 0.7
  assert_close(dense(x, leaf, key), h @ leaf.a @ leaf.b * 2.5, 1e-5, 'adapter only')
  base = LowRank(normal(rng, D_IN, D_OUT), leaf.a, leaf.b, 2.5, 0.5)  # the base sees all of x
  assert_close(dense(x, base, key) - dense(x, leaf, key), x @ base.w, 1e-5, 'base path')


@pytest.mark.parametrize('axis', [None, 0, 1])
def test_sparse_delta_holds_its_values_at_the_selected_entries_only(axis):
  rng = np.random.default_rng(7)
  leaf = sparse(rng, axis, 3, jnp.float32)
  want = np.zeros((D_IN, D_OUT), np.float32)
  for j, i in enumerate(np.asarray(leaf.index)):
    if axis is None:
      want[i // D_OUT, i % D_OUT] = leaf.values[j]
    elif axis == 0:
      want[i] = leaf.values[j]
    else:
      want[:, i] = leaf.values[:, j]
  np.testing.assert_array_equal(leaf.delta(), want)
  np.testing.assert_array_equal(materialize(leaf), np.asarray(leaf.w) + want)
  with pytest.raises(ValueError, match='axis must be None'):
    SparseDelta(leaf.w, leaf.index, leaf.values, 2)


@pytest.mark.parametrize('axis', [0, 1])
def test_scaled_multiplies_the_rows_or_columns(axis):
  rng = np.random.default_rng(8)
  leaf = scaled(rng, axis, jnp.float32)
  w, s = np.asarray(leaf.w), np.asarray(leaf.scale)
  want = w * s[:, None] if axis == 0 else w * s[None, :]
  np.testing.assert_allclose(materialize(leaf), want, rtol=1e-6)
  with pytest.raises(ValueError, match='axis must be 0'):
    Scaled(leaf.w, leaf.scale, 2)
