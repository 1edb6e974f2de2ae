"""Bottleneck adapters around targeted modules of any Flax Linen model.

"Parameter-Efficient Transfer Learning for NLP" (Houlsby et al., 2019, arXiv:1902.00751):
sequential adapters with a residual; "Towards a Unified View of Parameter-Efficient Transfer
Learning" (He et al., 2022, arXiv:2110.04366): parallel adapters with a scale; each with and
without the residual, as "Parameter-Efficient Transfer Learning of Audio Spectrogram
Transformers" (Cappellazzo et al., 2023, arXiv:2307.03641) compares them. The equations are
in `peftjax.core.bottleneck`; the state holds each target's down / up projections and biases,
`apply` puts a `Bottleneck` into the target module's params and the model's calls run it
(`peftjax.core.linen`), the model's code unchanged.

Deviations from the papers' code:
- Houlsby's adapter-bert inserts the adapter after the projection's dropout; targeting the
  projection module (`attention/output` of the bundled BERT) places it before the block's
  dropout. Houlsby also trains the layer norms: chain `pj.full('norm')` before the adapter.
- `init='zero_up'` (the default; He et al.'s and MoSA's code): down as torch's `nn.Linear`
  (U(±1/sqrt(in))), up and biases zero, so an adapter at init leaves outputs unchanged exactly;
  `init='houlsby'`: both projections truncated N(0, init_scale²) (adapter-bert, 1e-3). The AST
  code zeroes both projections (then only the up bias gets a gradient); not offered.
- A parallel adapter reads the input of the module it wraps: on a single layer (the bundled
  BERT's `output` Dense) that is the layer's input, not the input of the whole FFN block that
  He et al.'s FFN adapter reads; target a module that spans the block where a model has one.
- No dropout inside the adapter.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.core import paths as P
from peftjax.core.adapter import Adapter
from peftjax.core.bottleneck import KEY, Bottleneck, check_options
from peftjax.methods.common import linear_init, module_paths, target_list

INITS = ('zero_up', 'houlsby')


def check_size(name: str, size):
  if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
    raise ValueError(f'{name} bottleneck size must be a positive int, got {size!r}')


def module_widths(params, targets, widths: dict | None = None) -> dict[str, tuple[int, int]]:
  """`{module path: (in, out)}` for the modules whose slash path a regex of `targets` finds.

  A module is any node of the param tree (`encoder/layer_0/attention`); its widths come from
  `widths` (`{regex: [in, out]}`, first match) or else its own 2-D `kernel` (in, out).

  Raises:
    PatternError: a target or `widths` pattern that matches no module (naming the closest).
    ValueError: a module whose widths are unknown, or that already holds an adapter.
  """
  flat = P.flatten(params)
  modules = module_paths(flat)
  chosen = P.select(modules, targets, what='module')
  P.check_overrides(chosen, widths, 'widths')
  out = {}
  for path in chosen:
    if f'{path}{P.SEP}{KEY}' in modules or f'{path}{P.SEP}{KEY}' in flat:
      raise ValueError(f'{path} already holds {KEY!r} in its params (one bottleneck adapter '
                       'per module)')
    given = P.first_match(path, widths, None)
    kernel = flat.get(f'{path}{P.SEP}kernel')
    if given is None and np.ndim(kernel) != 2:
      raise ValueError(f'cannot tell the input and output widths of module {path} from its '
                       f'params (it has no 2-D kernel); give widths={{{path!r}: [in, out]}}')
    d_in, d_out = given if given is not None else kernel.shape
    out[path] = (int(d_in), int(d_out))
  return out


def insert(config: dict, make_entry: Callable, make_leaf: Callable, **fields) -> Adapter:
  """A method that inserts a bottleneck module around each module `config['targets']` finds.

  Args:
    config: its JSON-able config with `targets`, `placement` and `widths`.
    make_entry: `(key, path, in, out) -> state entry` of one module (`in` is the width the
      adapter reads: the module's output, sequential, or input, parallel).
    make_leaf: `(path, entry) -> Bottleneck` that `apply` puts into the module's params.
    fields: further `Adapter` fields.
  """

  def init(rng, params, *, calib=None):
    del calib
    found = module_widths(params, config['targets'], config['widths'])
    state = {}
    for key, (path, (d_in, d_out)) in zip(jax.random.split(rng, len(found)), found.items()):
      read = d_out if config['placement'] == 'sequential' else d_in
      if config['placement'] == 'parallel' and config['residual'] and d_in != d_out:
        raise ValueError(f"{path}: a parallel adapter with the residual adds the module's "
                         f'input (width {d_in}) to its output (width {d_out}); use '
                         'residual=False or a module that keeps the width')
      state[path] = make_entry(key, path, read, d_out)
    return params, state

  def apply(frozen, state):
    flat = P.flatten(frozen)
    for path, entry in state.items():
      flat[f'{path}{P.SEP}{KEY}'] = make_leaf(path, entry)
    return P.unflatten(flat)

  def describe(frozen, state):  # shape: [width the adapter reads, width it adds to]
    del frozen
    return {path: {'shape': [int(e['down'].shape[0]), int(e['up'].shape[-1])],
                   'trainable': int(sum(np.size(v) for v in e.values())),
                   'size': int(e['down'].shape[1])}
            for path, e in state.items()}

  return Adapter(init=init, apply=apply, config=config, describe=describe, **fields)


def projections(key, d_in: int, size: int, d_out: int, init: str, init_scale: float):
  """`(down, up)`: see the module docstring for `init`."""
  k_down, k_up = jax.random.split(key)
  if init == 'houlsby':  # adapter-bert: truncated normal (at 2 std) for both
    normal = lambda k, shape: jax.random.truncated_normal(k, -2.0, 2.0, shape) * init_scale
    return normal(k_down, (d_in, size)), normal(k_up, (size, d_out))
  return (linear_init(k_down, (d_in, size), d_in),
          jnp.zeros((size, d_out), jnp.float32))


def bottleneck_adapter(targets, size: int = 64, *, placement: str = 'sequential',
                       residual: bool = True, activation: str = 'gelu', scale: float = 1.0,
                       init: str = 'zero_up', init_scale: float = 1e-3,
                       widths: dict | None = None) -> Adapter:
  """Bottleneck adapters (Houlsby et al., 2019; parallel: He et al., 2022) around modules.

  Args:
    targets: regexes searched in module paths, e.g. `attention/output$`, `layer_\\d+/output$`.
    size: the bottleneck width r (down: in x r, up: r x out).
    placement: 'sequential' (reads the module's output) or 'parallel' (reads its input).
    residual: add the adapter's input to its output (the identity path; module docstring
      of `peftjax.core.bottleneck`). With 'zero_up', outputs are unchanged at init for
      sequential with and parallel without the residual.
    activation: a name of `peftjax.core.bottleneck.ACTIVATIONS`.
    scale: s, the factor of the adapter's output (He et al.'s scaled parallel adapter: 4).
    init: one of `INITS` (module docstring); `init_scale` is the std of 'houlsby'.
    widths: `{regex: [in, out]}` for modules without a 2-D `kernel` of their own.

  Returns:
    An `Adapter` whose state is `{module path: {'down', 'down_bias', 'up', 'up_bias'}}`; it
      has no merged tree (`pj.merge` raises `NotMergeableError`) and no `unmerge`.

  Example:
    adapter = pj.bottleneck_adapter([r'attention/output$', r'layer_\\d+/output$'], size=32)

  References:
    Houlsby et al., 2019, arXiv:1902.00751 (sequential); He et al., 2022,
    arXiv:2110.04366 (parallel); Cappellazzo et al., 2023, arXiv:2307.03641 (the residual).
  """
  check_options(placement, activation)
  check_size('adapter', size)
  if init not in INITS:
    raise ValueError(f'unknown adapter init {init!r}; expected one of {INITS}')
  config = dict(method='adapter', targets=target_list(targets), size=size,
                placement=placement, residual=bool(residual), activation=activation,
                scale=float(scale), init=init, init_scale=float(init_scale),
                widths={k: [int(n) for n in v] for k, v in (widths or {}).items()})

  def make_entry(key, path, d_in, d_out):
    del path
    down, up = projections(key, d_in, size, d_out, init, init_scale)
    return {'down': down, 'down_bias': jnp.zeros((size,), jnp.float32),
            'up': up, 'up_bias': jnp.zeros((d_out,), jnp.float32)}

  def make_leaf(path, e):
    del path
    return Bottleneck(e['down'], e['down_bias'], e['up'], e['up_bias'], placement,
                      residual, scale, activation)

  return insert(config, make_entry, make_leaf)
