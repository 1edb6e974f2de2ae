"""Calibration statistics for data-driven initialisations (CorDA, EVA, LoRA-GA).

A `Calibration` holds a model's apply function, its params, a few batches and optionally a
loss, and computes per target kernel, on request only:
- `activations(path)`: a capped, evenly spread sample of the (unmasked) rows x fed to the
  kernel (as in `x @ kernel`), float32 (n, in);
- `covariance(path)`: C = X^T X / n over every unmasked row of every batch, (in, in);
- `gradient(path)`: dL/dkernel averaged over the batches, (in, out) (needs `loss_fn`);
- `squared_gradient(path)`: (dL/dkernel)^2 of each batch, averaged over the batches, (in, out)
  (needs `loss_fn`; SPT's parameter sensitivity).

Inputs are captured with `flax.linen.intercept_methods`, so any Linen model works: a target
is the 2-D `kernel` param of a module whose `__call__` takes x (first positional argument)
with `x.shape[-1] == kernel.shape[0]` (`nn.Dense`, the bundled models' `Dense`). The module's
scope path plus `kernel` is its slash path (`peftjax.core.paths`), so the module tree's root
must be the root of `params`. A module called several times (shared weights) contributes
every call. Lifted transforms that stack kernels (`nn.scan`) are not supported.

Laziness and memory: building a `Calibration` runs nothing and does not read the batches
(`batches` may be a zero-argument callable). The `iter_*` generators split the requested
paths into groups whose statistics fit in `max_bytes` (always at least one path per group;
estimates: in*in*4 per covariance, in*out*4 per gradient, max_rows*in*4 per sample) and, per
group, run the model (or its gradient) once per batch, accumulating only that group's
statistics; the group's results are handed out one by one and dropped by the generator as
they go. With `max_bytes=0` a single target's statistics exist at a time (one model pass per
target and batch). Nothing is cached beyond the jitted functions. Statistics come from the
model in inference mode (no dropout rng) and are deterministic for given batches.

`Restored` is what `load_adapter` passes as `calib`: the saved state and the initial factors
of a file (`CalibratedResidual`), so data-driven methods rebuild their frozen tree without
the calibration data.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax.core import paths as P
from peftjax.core.leaves import LowRank

_HI = jax.lax.Precision.HIGHEST


class Calibration:
  """Lazily computed per-target statistics of a model on a few batches.

  Args:
    apply_fn: `apply_fn(params, batch)` runs the model (a Linen `module.apply` inside); not
      jitted (Calibration jits it; an inner jit would hide the inputs it captures).
    params: the params the statistics are taken at (plain arrays at the requested paths).
    batches: a sequence of batches, or a zero-argument callable returning an iterable.
    loss_fn: `loss_fn(params, batch) -> scalar`, needed for `gradient`.
    mask_fn: `mask_fn(batch) -> array` of the rows' weights (> 0 counts), shaped like the
      leading axes of the targets' inputs (e.g. [B, L] attention mask); None: every row.
    max_rows: cap on the rows `activations` returns per target.
    max_bytes: statistics held at a time per group of targets (see the module docstring).
  """

  def __init__(self, apply_fn: Callable, params, batches: Sequence | Callable[[], Iterable],
               *, loss_fn: Callable | None = None, mask_fn: Callable | None = None,
               max_rows: int = 4096, max_bytes: int = 1 << 28):
    if max_rows < 1:
      raise ValueError(f'max_rows must be >= 1, got {max_rows}')
    self.apply_fn, self.params, self.loss_fn, self.mask_fn = apply_fn, params, loss_fn, mask_fn
    self.max_rows, self.max_bytes = int(max_rows), int(max_bytes)
    self._source, self._batches, self._flat, self._jitted = batches, None, None, {}

  @property
  def batches(self) -> list:
    if self._batches is None:
      source = self._source() if callable(self._source) else self._source
      self._batches = list(source)
      if not self._batches:
        raise ValueError('Calibration needs at least one batch')
    return self._batches

  def kernel_shape(self, path: str) -> tuple[int, int]:
    """The (in, out) shape of the kernel at `path`; an error names close paths if absent."""
    if self._flat is None:
      self._flat = {p: v for p, v in P.flatten(self.params).items() if np.ndim(v) == 2}
    if path not in self._flat:
      raise P.PatternError('Calibration: ' + P.no_match_message(path, list(self._flat),
                                                                 '2-D kernel'))
    return tuple(self._flat[path].shape)

  # ------------------------------------------------------------------ one target at a time
  def covariance(self, path: str) -> jax.Array:
    return next(self.iter_covariances([path]))[1]

  def activations(self, path: str, max_rows: int | None = None) -> np.ndarray:
    return next(self.iter_activations([path], max_rows))[1]

  def gradient(self, path: str) -> jax.Array:
    return next(self.iter_gradients([path]))[1]

  def squared_gradient(self, path: str) -> jax.Array:
    return next(self.iter_squared_gradients([path]))[1]

  # ------------------------------------------------------------------------------- grouped
  def iter_covariances(self, paths: Sequence[str]) -> Iterator[tuple[str, jax.Array]]:
    """`(path, X^T X / n)` for each path in order (float32)."""
    for group in self._groups(paths, lambda s: 4 * s[0] * s[0]):
      fn = self._capture(group, 'cov')
      acc = None
      for batch in self.batches:
        out = fn(self.params, batch)
        acc = out if acc is None else jax.tree.map(jnp.add, acc, out)
      for path in group:
        xtx, n = acc.pop(path)
        if float(n) <= 0:
          raise ValueError(f'Calibration: no unmasked input rows reached {path}')
        yield path, xtx / n

  def iter_activations(self, paths: Sequence[str],
                       max_rows: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """`(path, X)` with at most `max_rows` unmasked rows, spread evenly over the batches."""
    cap = int(max_rows or self.max_rows)
    quota = -(-cap // len(self.batches))
    for group in self._groups(paths, lambda s: 4 * cap * s[0]):
      fn = self._capture(group, 'rows')
      rows = {p: [] for p in group}
      for batch in self.batches:
        for path, (x, m) in jax.device_get(fn(self.params, batch)).items():
          x = x[m > 0]
          if len(x) > quota:
            x = x[np.linspace(0, len(x) - 1, quota).round().astype(int)]
          rows[path].append(x)
      for path in group:
        x = np.concatenate(rows.pop(path))[:cap]
        if not len(x):
          raise ValueError(f'Calibration: no unmasked input rows reached {path}')
        yield path, x

  def iter_gradients(self, paths: Sequence[str]) -> Iterator[tuple[str, jax.Array]]:
    """`(path, mean over batches of dL/dkernel)` for each path in order (float32)."""
    return self._iter_grads(paths, squared=False)

  def iter_squared_gradients(self, paths: Sequence[str]) -> Iterator[tuple[str, jax.Array]]:
    """`(path, mean over batches of (dL/dkernel)^2)` for each path in order (float32): each
    batch's gradient squared entrywise, then averaged (not the square of `gradient`)."""
    return self._iter_grads(paths, squared=True)

  def _iter_grads(self, paths, squared: bool):
    if self.loss_fn is None:
      raise ValueError('Calibration: gradients need a loss_fn(params, batch)')
    for group in self._groups(paths, lambda s: 4 * s[0] * s[1]):
      fn = self._grad_fn(group, squared)
      flat = P.flatten(self.params)
      for path in group:
        if not isinstance(flat[path], (jax.Array, np.ndarray)):
          raise ValueError(f'Calibration: {path} is a {type(flat[path]).__name__}, not a '
                           f'plain kernel; gradients are taken w.r.t. plain arrays only')
      sub = {p: flat[p] for p in group}
      acc = None
      for batch in self.batches:
        out = fn(sub, self.params, batch)
        acc = out if acc is None else jax.tree.map(jnp.add, acc, out)
      for path in group:
        yield path, acc.pop(path) / len(self.batches)

  # ------------------------------------------------------------------------------ plumbing
  def _groups(self, paths, nbytes) -> list[list[str]]:
    paths = list(dict.fromkeys(paths))
    groups, size = [], 0
    for path in paths:
      cost = nbytes(self.kernel_shape(path))
      if groups and size + cost <= self.max_bytes:
        groups[-1].append(path)
        size += cost
      else:
        groups.append([path])
        size = cost
    return groups

  def _capture(self, group: list[str], kind: str):
    """Jitted `(params, batch) -> {path: stat}` capturing the inputs of `group`'s kernels."""
    key = (kind, tuple(group))
    if key in self._jitted:
      return self._jitted[key]
    shapes = {p: self.kernel_shape(p) for p in group}

    def stats(params, batch):
      mask = None if self.mask_fn is None else jnp.asarray(self.mask_fn(batch))
      out = {}

      def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == '__call__' and module.scope is not None and args:
          path = P.SEP.join((*map(str, module.scope.path), 'kernel'))
          if path in shapes:
            out[path] = _merge(kind, out.get(path), _reduce(kind, path, args[0], shapes[path],
                                                            mask))
        return next_fun(*args, **kwargs)

      with nn.intercept_methods(interceptor):
        self.apply_fn(params, batch)
      missing = [p for p in group if p not in out]
      if missing:
        raise ValueError(f'Calibration: no module call fed the kernel(s) {missing}; inputs '
                         f'are captured from the __call__ of modules owning a 2-D "kernel"')
      return out

    jitted = jax.jit(stats)

    def call(params, batch):
      try:
        return jitted(params, batch)
      except jax.errors.UnexpectedTracerError:
        raise ValueError('Calibration: apply_fn must not be jax.jit-ed (the inputs it '
                         'captures would leak from its trace); pass the plain function, '
                         'Calibration jits it') from None

    self._jitted[key] = call
    return call

  def _grad_fn(self, group: list[str], squared: bool = False):
    key = ('grad2' if squared else 'grad', tuple(group))
    if key not in self._jitted:
      def grads(sub, params, batch):
        def loss(sub):
          return self.loss_fn(P.unflatten({**P.flatten(params), **sub}), batch)
        g = jax.tree.map(lambda x: x.astype(jnp.float32), jax.grad(loss)(sub))
        return jax.tree.map(jnp.square, g) if squared else g
      self._jitted[key] = jax.jit(grads)
    return self._jitted[key]

  def __repr__(self):
    n = 'lazy' if self._batches is None else len(self._batches)
    return (f'Calibration(batches={n}, loss_fn={self.loss_fn is not None}, '
            f'max_rows={self.max_rows}, max_bytes={self.max_bytes})')


def _reduce(kind, path, x, shape, mask):
  x = jnp.asarray(x)
  if x.shape[-1] != shape[0]:
    raise ValueError(f'Calibration: the module of {path} got input {x.shape}, but its kernel '
                     f'is {shape}: only Dense-like modules (x @ kernel) are supported')
  x = x.reshape(-1, shape[0]).astype(jnp.float32)
  m = jnp.ones((x.shape[0],), jnp.float32) if mask is None else mask.reshape(-1)
  if m.shape[0] != x.shape[0]:
    raise ValueError(f'Calibration: mask_fn gives {m.shape[0]} rows but {path} sees '
                     f'{x.shape[0]} input rows (input {x.shape})')
  m = m.astype(jnp.float32)
  if kind == 'rows':
    return x, m
  return jnp.matmul((x * m[:, None]).T, x, precision=_HI), jnp.sum(m)


def _merge(kind, old, new):
  if old is None:
    return new
  if kind == 'rows':
    return tuple(jnp.concatenate([o, n]) for o, n in zip(old, new))
  return tuple(o + n for o, n in zip(old, new))


@jax.tree_util.register_pytree_with_keys_class  # key paths end in w / a / b, as LowRank's
class CalibratedResidual(LowRank):
  """A frozen residual `w` that keeps the data-derived initial factors `a`, `b` it was made
  with (`w = W - scale * a @ b`). Its value is `w` (the delta is off: scale 0); adapter files
  save `a` and `b`, so that loading rebuilds the residual from the base W alone."""

  def __init__(self, w, a, b, scale: float = 0.0, dropout: float = 0.0):
    del scale, dropout
    super().__init__(w, a, b, 0.0, 0.0)


class Restored:
  """The `calib` that `load_adapter` passes to `init`: a file's saved tensors, no data.

  `state` and `frozen` are flat `{'path/leaf': array}` dicts (the file's `state/` and `frozen/`
  sections). Data-driven methods take their initial factors (`factors`) or ranks (`state_leaf`)
  from it instead of computing statistics.
  """

  def __init__(self, state: Mapping[str, Any] | None = None,
               frozen: Mapping[str, Any] | None = None):
    self.state, self.frozen = dict(state or {}), dict(frozen or {})

  def factors(self, path: str) -> tuple[Any, Any] | None:
    """The initial `(a, b)` saved for the `CalibratedResidual` at `path`, or None."""
    a, b = self.frozen.get(f'{path}{P.SEP}a'), self.frozen.get(f'{path}{P.SEP}b')
    return None if a is None or b is None else (a, b)

  def state_leaf(self, path: str, leaf: str):
    """The saved state leaf `path/leaf` (also inside a chain, as `i/path/leaf`), or None."""
    key = f'{path}{P.SEP}{leaf}'
    if key in self.state:
      return self.state[key]
    pattern = re.compile(r'\d+' + re.escape(P.SEP + key))
    hits = [v for k, v in self.state.items() if pattern.fullmatch(k)]
    return hits[0] if hits else None

  def __repr__(self):
    return f'Restored(state={len(self.state)} tensors, frozen={len(self.frozen)} tensors)'


def calibrated_tensors(frozen) -> dict[str, np.ndarray]:
  """`{'path/a': a, 'path/b': b}` of every `CalibratedResidual` in `frozen` (for files)."""
  out = {}
  for path, leaf in P.flatten(frozen).items():
    if isinstance(leaf, CalibratedResidual):
      out[f'{path}{P.SEP}a'], out[f'{path}{P.SEP}b'] = np.asarray(leaf.a), np.asarray(leaf.b)
  return out


def live(name: str, calib) -> Calibration:
  """`calib` if it is a `Calibration`, else an error saying that `name` needs one."""
  if isinstance(calib, Calibration):
    return calib
  got = 'nothing' if calib is None else type(calib).__name__
  raise ValueError(f'{name} is initialised from data: pass calib=Calibration(apply_fn, params, '
                   f'batches, ...) to init (got {got}); the trainer builds one from '
                   f'config.calibration')
