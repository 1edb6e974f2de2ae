"""Bottleneck modules that a param tree inserts around a module of any Flax Linen model.

A `Bottleneck` placed in a module's own params under the key `KEY` wraps that module's call
(`peftjax.core.linen`, inside `structured_layers()`). With f the module, x its first
positional input, y = f(x), s the scale and A(u) = act(u @ down + down_bias) @ up + up_bias:

  sequential:  y + s·A(y)         without the residual: s·A(y)
  parallel:    y + s·A(x)         with the residual:    y + s·A(x) + x

as compared in "Parameter-Efficient Transfer Learning of Audio Spectrogram Transformers"
(Cappellazzo et al., 2023, arXiv:2307.03641; their `APPLY_RESIDUAL`). Sequential with the
residual is Houlsby et al.'s adapter (arXiv:1902.00751), parallel without it He et al.'s
parallel adapter (arXiv:2110.04366).

Linen modules read only the params they ask for, so the extra key changes nothing in the
model's code or in a run without the interceptor. No tree of weights can hold such a module:
`pj.merge` refuses a tree holding one. `paths.flatten` keeps a `Bottleneck` whole (one leaf
per module, as a structured leaf per weight), so later methods of a chain keep it intact; it
has no array shape (`ndim` 0), so their selections of 2-D weights skip it.

`Inserted` is the protocol of every such module (a `Bottleneck`, the prompts of
`peftjax.methods.prompts`): `wrap(call, args, kwargs, draw, where)` returns what the host
module's call returns with the module around it; `call(*args, **kwargs)` runs the host and
`draw()` is the host's next 'dropout' rng (None outside training). A bottleneck adds to the
call's output; prompts edit its input and output.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

KEY = 'bottleneck'  # the key of the inserted module in its host module's params
PLACEMENTS = ('sequential', 'parallel')
ACTIVATIONS = {
    'relu': jax.nn.relu,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),  # original BERT's gelu
    'silu': jax.nn.silu,
    'tanh': jnp.tanh,
    'identity': lambda h: h,
}


def check_options(placement: str, activation: str):
  if placement not in PLACEMENTS:
    raise ValueError(f'bottleneck placement {placement!r}; expected one of {PLACEMENTS}')
  if activation not in ACTIVATIONS:
    raise ValueError(f'bottleneck activation {activation!r}; expected one of '
                     f'{sorted(ACTIVATIONS)}')


class Inserted:
  """A module that a param tree places among a host module's own params, around its calls.

  Subclasses are registered pytrees (`paths.flatten` keeps one whole: no array shape).
  """
  ndim, shape = 0, ()

  def wrap(self, call, args: tuple, kwargs: dict, draw=lambda: None, where: str = 'module'):
    raise NotImplementedError


@jax.tree_util.register_pytree_with_keys_class
class Bottleneck(Inserted):
  """down (in, r), down_bias (r,), up (r, out), up_bias (out,) and how they wrap the call.

  `in` is the width of what the adapter reads: the module's output (sequential) or input
  (parallel); `out` is the module's output width.
  """
  children = ('down', 'down_bias', 'up', 'up_bias')
  stochastic = False  # whether a training call draws from the module's 'dropout' rng

  def __init__(self, down, down_bias, up, up_bias, placement: str = 'sequential',
               residual: bool = True, scale: float = 1.0, activation: str = 'gelu'):
    check_options(placement, activation)
    self.down, self.down_bias, self.up, self.up_bias = down, down_bias, up, up_bias
    self.placement, self.residual = placement, bool(residual)
    self.scale, self.activation = float(scale), activation

  def _aux(self):
    return self.placement, self.residual, self.scale, self.activation

  def tree_flatten(self):
    return tuple(getattr(self, k) for k in self.children), self._aux()

  def tree_flatten_with_keys(self):  # key paths end in the children's names
    return (tuple((jax.tree_util.GetAttrKey(k), getattr(self, k)) for k in self.children),
            self._aux())

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  def weights(self, rng=None):
    """`(down, down_bias, up, up_bias)` of one call; `rng` is its 'dropout' rng (training)."""
    del rng
    return self.down, self.down_bias, self.up, self.up_bias

  def wrap(self, call, args, kwargs, draw=lambda: None, where: str = 'module'):
    y = call(*args, **kwargs)
    return self(args[0], y, draw() if self.stochastic else None, where)  # drawn after the host

  def __call__(self, x, y, rng=None, where: str = 'module'):
    """The output of the wrapped call: `y = f(x)` with the adapter added (module docstring)."""
    if not isinstance(y, jax.Array) or y.ndim == 0:
      raise TypeError(f'{where}: a bottleneck adapter wraps a module that returns one array; '
                      f'this one returns {type(y).__name__}')
    down, down_bias, up, up_bias = self.weights(rng)
    sequential = self.placement == 'sequential'
    read = y if sequential else x
    if getattr(read, 'shape', (None,))[-1:] != down.shape[:1] or y.shape[-1] != up.shape[-1]:
      raise ValueError(
          f"{where}: its {self.placement} bottleneck adapter reads the module's "
          f"{'output' if sequential else 'input'} of width {down.shape[0]} and adds to its "
          f'output of width {up.shape[-1]}, but the call maps {getattr(x, "shape", x)} to '
          f'{y.shape}; give the method the widths of this module (widths={{regex: [in, out]}})')
    if not sequential and self.residual and x.shape != y.shape:
      raise ValueError(f"{where}: a parallel adapter with the residual adds the module's "
                       f'input {x.shape} to its output {y.shape}; their shapes must agree')
    dtype = y.dtype
    h = ACTIVATIONS[self.activation](read.astype(dtype) @ down.astype(dtype)
                                     + down_bias.astype(dtype))
    a = (h @ up.astype(dtype) + up_bias.astype(dtype)) * jnp.asarray(self.scale, dtype)
    if sequential:
      return y + a if self.residual else a
    return y + a + x.astype(dtype) if self.residual else y + a

  def __repr__(self):
    return (f'{type(self).__name__}({self.placement}, residual={self.residual}, '
            f'{self.down.shape[0]}->{self.down.shape[1]}->{self.up.shape[-1]}, '
            f'{self.activation}, scale={self.scale:g})')
