"""Structured leaves inside the standard `flax.linen` layers of any model.

Within `structured_layers()`, a `nn.Dense`, `nn.DenseGeneral` (one contracted axis, one
feature axis), `nn.Einsum` (a 2-D kernel with one contracted axis) or `nn.Embed` whose kernel
(embedding) is a structured leaf (`leaves.STRUCTURED`) computes with `leaves.dense` (or
a row gather), so a model written without peftjax runs an adapter's `apply` tree unchanged and never
forms a full-size weight or weight gradient. The layer's `dtype` promotion and bias are kept;
`precision` and custom `dot_general` settings do not apply to structured kernels. Adapter
dropout is active when the call has a 'dropout' rng (i.e. training).

Modules that compute structured kernels themselves (the bundled models' `Dense`) declare it
with a class attribute `handles_structured = True`; any other module that finds a structured
leaf among its own params raises an error that names it.

A module whose own params hold a `bottleneck.Inserted` (a `Bottleneck` under `bottleneck.KEY`,
prompts) has its call wrapped by it, whatever the module (`peftjax.core.bottleneck`); several
wrap it in the order of their keys, the first innermost. The inserted modules of one apply
share a dict, `shared()`, in which one can leave values for another (a side network's taps
for its output module); it starts empty at each apply's outermost call, and the calls inside
a lifted transform (`nn.remat`, `nn.scan`, whose values cannot leave it) get one of their own.
"""
from __future__ import annotations

import contextlib
import functools
import string
import threading

import flax.linen as nn
import jax.numpy as jnp

from peftjax.core import bottleneck, leaves
from peftjax.core import paths as P


@contextlib.contextmanager
def structured_layers():
  """Runs the `flax.linen` layers of the enclosed applies with structured kernels.

  Inside it, `nn.Dense`, `nn.DenseGeneral`, `nn.Einsum` and `nn.Embed` of any model compute
  `LowRank`, `SparseDelta` and `Scaled` leaves from their parts, and modules that methods
  insert (bottleneck adapters, prompts) run around their targets' calls; outside it, Linen
  sees only plain arrays.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, peftjax as pj
    >>> layer = nn.Dense(3)
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 4)))['params']
    >>> adapter = pj.lora('kernel', rank=2)
    >>> frozen, state = adapter.init(jax.random.key(0), params)
    >>> with pj.structured_layers():
    ...   y = layer.apply({'params': adapter.apply(frozen, state)}, jnp.ones((1, 4)))
    >>> y.shape
    (1, 3)
  """
  with nn.intercept_methods(_interceptor):
    yield


def apply(module: nn.Module, params, *args, rng=None, **kwargs):
  """`module.apply({'params': params}, *args, **kwargs)` with structured kernels, and a
  'dropout' rng if `rng` is given.

  Args:
    module: any `flax.linen` module.
    params: its params, plain or as an adapter's `apply` returned them.
    *args, **kwargs: the module's call arguments.
    rng: the 'dropout' PRNG key of a training call; None for inference.

  Returns:
    What the module returns.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, peftjax as pj
    >>> layer = nn.Dense(3)
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 4)))['params']
    >>> frozen, state = pj.lora('kernel', rank=2).init(jax.random.key(0), params)
    >>> pj.apply(layer, pj.lora('kernel', rank=2).apply(frozen, state), jnp.ones((1, 4))).shape
    (1, 3)
  """
  with structured_layers():
    return module.apply({'params': params}, *args,
                        rngs=None if rng is None else {'dropout': rng}, **kwargs)


_SHARED = threading.local()  # stack: (root scope, dict) per running apply; hosts: scopes


def shared() -> dict:
  """The dict that the inserted modules of the running apply share (module docstring).

  Raises:
    RuntimeError: called outside an inserted module's call inside `structured_layers()`.
  """
  stack, hosts = getattr(_SHARED, 'stack', None), getattr(_SHARED, 'hosts', None)
  if not stack or not hosts:
    raise RuntimeError('linen.shared() is for inserted modules running inside an apply in '
                       'structured_layers()')
  return stack[-1][1].setdefault(id(hosts[-1].root), {})  # a lifted transform's: its own


def _interceptor(next_fun, args, kwargs, context):
  scope = context.module.scope
  stack = _SHARED.__dict__.setdefault('stack', [])
  if scope is not None and not scope.path and not (stack and stack[-1][0] is scope):
    stack.append((scope, {}))  # an apply's (or a lifted transform's) outermost call
    try:
      return _intercepted(next_fun, args, kwargs, context)
    finally:
      stack.pop()
  return _intercepted(next_fun, args, kwargs, context)


def _intercepted(next_fun, args, kwargs, context):
  module = context.module
  if context.method_name != '__call__' or module.scope is None or not args:
    return next_fun(*args, **kwargs)
  own = module.variables.get('params', {})
  call = lambda *a, **k: _layer_call(next_fun, a, k, module)
  for key in sorted(own):  # modules around this call
    if isinstance(own[key], bottleneck.Inserted):
      call = functools.partial(_inserted_call, own[key], call, module)
  return call(*args, **kwargs)


def _inserted_call(inserted, call, module, *args, **kwargs):
  hosts = _SHARED.__dict__.setdefault('hosts', [])
  hosts.append(module.scope)
  try:
    return inserted.wrap(call, args, kwargs, lambda: _rng(module),
                         where=P.SEP.join(map(str, module.scope.path)))
  finally:
    hosts.pop()


def _layer_call(next_fun, args, kwargs, module):
  own = {k: v for k, v in module.variables.get('params', {}).items()
         if leaves.is_structured(v)}
  if not own or getattr(module, 'handles_structured', False):
    return next_fun(*args, **kwargs)
  for kind, run in _LAYERS:
    if isinstance(module, kind):
      return run(module, *args, **kwargs)
  path = P.SEP.join(map(str, module.scope.path))
  raise TypeError(
      f'{path}: {type(module).__name__} holds a structured leaf ({", ".join(own)}) but cannot '
      'compute with one; peftjax runs them in nn.Dense, nn.DenseGeneral, nn.Einsum and nn.Embed '
      '(or a module with handles_structured = True). Leave this param out of the targets, or '
      'run the merged tree (pj.merge).')


def _rng(module):
  return module.make_rng('dropout') if module.has_rng('dropout') else None


def _param(module, name):
  return module.get_variable('params', name)


def _dtype(module, x, *params):
  arrays = [p for p in params if p is not None]
  return module.dtype or jnp.result_type(x, *(p.dtype for p in arrays))


def _add_bias(y, bias):
  return y if bias is None else y + bias.astype(y.dtype)


def _dense(module: nn.Dense, x):
  kernel = _param(module, 'kernel')
  bias = _param(module, 'bias') if module.use_bias else None
  x = x.astype(_dtype(module, x, kernel, bias))
  return _add_bias(leaves.dense(x, kernel, _rng(module)), bias)


def _dense_general(module: nn.DenseGeneral, x):
  kernel = _param(module, 'kernel')
  axis = module.axis if isinstance(module.axis, int) else tuple(module.axis)
  if isinstance(axis, tuple) and len(axis) == 1:
    axis = axis[0]
  if not isinstance(axis, int) or kernel.ndim != 2 or module.batch_dims:
    raise TypeError(f'{P.SEP.join(map(str, module.scope.path))}: a structured kernel in '
                    'nn.DenseGeneral needs one contracted axis, one feature axis and no '
                    f'batch_dims (axis={module.axis}, kernel shape {kernel.shape})')
  bias = _param(module, 'bias') if module.use_bias else None
  x = jnp.moveaxis(x, axis, -1).astype(_dtype(module, x, kernel, bias))
  return _add_bias(leaves.dense(x, kernel, _rng(module)), bias)


def _einsum(module: nn.Einsum, x, einsum_str=None):
  equation = (einsum_str or module.einsum_str).replace(' ', '')
  kernel = _param(module, 'kernel')
  bias = _param(module, 'bias') if module.use_bias else None
  lhs, out = equation.split('->')
  x_subs, k_subs = lhs.split(',')
  x_subs, out = _expand_ellipsis(x_subs, out, x.ndim)
  plan = _einsum_plan(x_subs, k_subs, out) if kernel.ndim == 2 else None
  if plan is None:
    raise TypeError(f'{P.SEP.join(map(str, module.scope.path))}: a structured kernel in '
                    'nn.Einsum needs an equation that contracts one input axis with one axis '
                    f'of a 2-D kernel and keeps the other; got {equation!r}')
  contracted, transpose, out_perm = plan
  dtype = _dtype(module, x, kernel, bias)
  x = jnp.moveaxis(x, contracted, -1).astype(dtype)
  y = leaves.dense(x, _transposed(kernel) if transpose else kernel, _rng(module))
  return jnp.transpose(_add_bias(y, bias), out_perm)  # the feature axis is last until here


def _expand_ellipsis(x_subs: str, out: str, ndim: int):
  if '...' not in x_subs:
    return x_subs, out
  free = [c for c in string.ascii_letters if c not in x_subs + out]
  fill = ''.join(free[:ndim - len(x_subs.replace('...', ''))])
  return x_subs.replace('...', fill), out.replace('...', fill)


def _einsum_plan(x_subs: str, k_subs: str, out: str):
  """`(contracted input axis, kernel stored (out, in), output permutation)` for an equation
  `x_subs,k_subs->out` that is a matrix product on one axis; None otherwise."""
  if len(k_subs) != 2 or len(set(x_subs)) != len(x_subs):
    return None
  shared = [c for c in k_subs if c in x_subs]
  if len(shared) != 1:
    return None
  (i,), (o,) = shared, [c for c in k_subs if c != shared[0]]
  kept = x_subs.replace(i, '') + o
  if i in out or sorted(out) != sorted(kept):
    return None
  return x_subs.index(i), k_subs.index(i) == 1, [kept.index(c) for c in out]


def _transposed(kernel):
  """The structured leaf of `kernel.T` (its factors swapped and transposed)."""
  if isinstance(kernel, leaves.LowRank):
    return leaves.LowRank(_transposed(kernel.w), kernel.b.T, kernel.a.T, kernel.scale,
                          kernel.dropout)
  if isinstance(kernel, leaves.SparseDelta):
    if kernel.axis is not None:
      return leaves.SparseDelta(_transposed(kernel.w), kernel.index, kernel.values.T,
                                1 - kernel.axis)
    d_in, d_out = kernel.shape
    flipped = (kernel.index % d_out) * d_in + kernel.index // d_out
    order = jnp.argsort(flipped)
    return leaves.SparseDelta(_transposed(kernel.w), flipped[order], kernel.values[order])
  if isinstance(kernel, leaves.Scaled):
    return leaves.Scaled(_transposed(kernel.w), kernel.scale, 1 - kernel.axis)
  return kernel.T


def _embed(module: nn.Embed, ids):
  table = _param(module, 'embedding')
  return _rows(table, ids).astype(module.dtype or table.dtype)


def _rows(table, ids):
  """Rows `ids` of a (structured) embedding table, without forming the table."""
  if isinstance(table, leaves.LowRank):
    return _rows(table.w, ids) + (_rows(table.a, ids) @ table.b) * table.scale
  if isinstance(table, leaves.SparseDelta):
    return _rows(table.w, ids) + _sparse_rows(table, ids).astype(table.dtype)
  if isinstance(table, leaves.Scaled):
    scale = table.scale if table.axis == 1 else jnp.take(table.scale, ids)[..., None]
    return _rows(table.w, ids) * scale.astype(table.dtype)
  return jnp.take(table, ids, axis=0)


def _sparse_rows(table: leaves.SparseDelta, ids):
  """Rows `ids` of a `SparseDelta`'s D: a lookup for row and column selections; single
  entries form D (a full-size table)."""
  if table.axis == 0:
    pos = jnp.clip(jnp.searchsorted(table.index, ids), 0, table.index.shape[0] - 1)
    hit = (table.index[pos] == ids)[..., None]
    return jnp.where(hit, table.values[pos], 0)
  if table.axis == 1:
    rows = jnp.take(table.values, ids, axis=0)
    return jnp.zeros((*ids.shape, table.shape[1]), rows.dtype).at[..., table.index].set(rows)
  return jnp.take(table.delta(), ids, axis=0)


_LAYERS = ((nn.Dense, _dense), (nn.DenseGeneral, _dense_general), (nn.Einsum, _einsum),
           (nn.Embed, _embed))
