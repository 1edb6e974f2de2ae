"""Low-precision adapters: "Revisiting the Parameter Efficiency of Adapters from the
Perspective of Precision Redundancy" (Jie, Wang & Deng, ICCV 2023, arXiv:2307.16867).

`low_precision(adapter, bits)` wraps any method: the weights of its state run quantised to
`bits` (1, 2, 4 or 8) per entry, and adapter files hold them as packed codes
(`peftjax.io.bits`) with two float32 numbers per tensor, the state dequantised on load.
Trained through the wrapper it is the paper's quantisation-aware training; wrapped around an
already trained state at save time it is post-training quantisation of any method (the
wrapper leaves `init` and the state unchanged):

  pj.save_adapter(directory, pj.low_precision(adapter, bits=4), frozen, state)

The quantiser (the official `QLinear`): per tensor, with m = mean(w), s = std(w) (unbiased)
and n = (w - m) / (s + 1e-5), Q(w) = m + s * c_k, c_k the code of the standard-normal
codebook nearest to n. The 2**bits codes are the fixed point of the official iteration:
thresholds halfway between adjacent codes, each code the median of N(0, 1) over its cell
(`norm.ppf` of the cell's middle probability). That is Lloyd's algorithm for the absolute
error, so for normally distributed weights the codebook and the scale s minimise
E|w - Q(w)|; 1 bit gives m +- 0.6745 s (the median of |n|), not the max-abs scale.
Bound: Q(w) is the grid value m + s * c_j nearest to w (up to 1e-5 * (|n| + |c_j|)), so
|w - Q(w)| <= s * g / 2 + 1e-5 * |n| for n between the outer codes (g the gap between the
two codes around n); entries beyond them are clipped to the outer code.

Training (the official forward): the state's tensors run as Q(w) with a straight-through
estimator on the rounding of n alone: gradients reach w through n and through m and s
(which are not detached).

Deviations from the official code:
- The codebook is solved to its fixed point (residual < 1e-12); the official 500 iterations
  from all-zero codes reach it at 1, 2 and 4 bits (to 3e-8) but not at 8 bits, where their
  codes have 4.6x its absolute error on N(0, 1) (0.0223 vs 0.0049).
- A tensor with s = 0 (LoRA's B, an adapter's up projection at zero init, with
  `init_scale=0`) runs as its mean with the identity gradient; the official std has no
  gradient there (0/0), which is why its code starts such weights from a truncated normal of
  std 1e-3 within +-2e-3: `init_scale` (default 1e-3) does the same to every quantised
  tensor that the wrapped `init` leaves constant, so outputs change slightly at init.
- A value exactly on a threshold takes the lower code (the official sum of signs gives the
  two codes' midpoint there).
- Which tensors: by default every state leaf of two or more dimensions (the projections);
  biases and other vectors stay in float32 (the official adapters have none); `leaves`
  chooses others. The official code also quantises the head ("Bi-Head"); here the task head
  is not part of the method and stays in float32.

A state loaded from a file holds `Quantized` leaves (codes, mean, std): `apply` and `merge`
run them dequantised, `save_adapter` writes them unchanged; `dequantized(state)` gives the
float state. The trained full-precision weights are not in the file.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize
from scipy.stats import norm

from peftjax.core import paths as P
from peftjax.core.adapter import Adapter, Codec, describe_targets
from peftjax.io import bits as packing

BITS = (1, 2, 4, 8)  # the official choices (besides 32: no wrapper)
EPS = 1e-5  # the official normalisation's epsilon: n = (w - mean) / (std + EPS)


def check_bits(bits):
  if bits not in BITS or isinstance(bits, bool):
    raise ValueError(f'low_precision bits must be one of {BITS}, got {bits!r}')


@functools.lru_cache(maxsize=None)
def codebook(bits: int) -> np.ndarray:
  """The 2**bits codes (float64, ascending, symmetric) that minimise E|n - Q(n)| for
  n ~ N(0, 1): the fixed point of the official iteration (module docstring)."""
  check_bits(bits)
  k = 2 ** bits

  def full(positive):
    return np.concatenate([-positive[::-1], positive])

  def step(codes):  # thresholds halfway; each code the median of its cell
    cdf = np.concatenate([[0.0], norm.cdf((codes[1:] + codes[:-1]) / 2), [1.0]])
    return norm.ppf((cdf[1:] + cdf[:-1]) / 2)

  # Start from the high-resolution optimum (point density ~ sqrt of the N(0, 1) density).
  start = np.sqrt(2.0) * norm.ppf((np.arange(k // 2, k) + 0.5) / k)
  solved = optimize.root(lambda pos: step(full(pos))[k // 2:] - pos, start, method='hybr',
                         tol=1e-13)
  codes = full(solved.x)
  residual = np.abs(step(codes) - codes).max()
  if not residual < 1e-9:
    raise RuntimeError(f'the {bits}-bit codebook did not converge (residual {residual:.2e})')
  return codes


def thresholds(bits: int) -> np.ndarray:
  """The cell boundaries: halfway between adjacent codes."""
  codes = codebook(bits)
  return (codes[1:] + codes[:-1]) / 2


def _statistics(w32):
  """`(mean, unbiased std)` of a float32 tensor; the std's gradient is 0 where it is 0."""
  mean = jnp.mean(w32)
  var = jnp.sum(jnp.square(w32 - mean)) / max(w32.size - 1, 1)
  spread = var > 0
  return mean, jnp.where(spread, jnp.sqrt(jnp.where(spread, var, 1.0)), 0.0)


def _nearest_code(n, bits: int):
  return jnp.searchsorted(jnp.asarray(thresholds(bits), n.dtype), n, side='left')


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def round_to_codes(n, bits: int):
  """The code nearest to each entry of `n`; the gradient passes straight through."""
  return jnp.asarray(codebook(bits), n.dtype)[_nearest_code(n, bits)]


def _round_fwd(n, bits):
  return round_to_codes(n, bits), None


def _round_bwd(bits, residuals, g):
  del bits, residuals
  return (g,)


round_to_codes.defvjp(_round_fwd, _round_bwd)


def quantize(w, bits: int):
  """`(codes, mean, std)`: uint8 code indices shaped like `w` and the float32 statistics."""
  w32 = jnp.asarray(w, jnp.float32)
  mean, std = _statistics(w32)
  codes = _nearest_code((w32 - mean) / (std + EPS), bits)
  return codes.astype(jnp.uint8), mean, std


def dequantize(codes, mean, std, bits: int, dtype=jnp.float32):
  """mean + std * codebook[codes], as `dtype`."""
  values = jnp.asarray(codebook(bits), jnp.float32)[jnp.asarray(codes, jnp.int32)]
  return (values * std + mean).astype(dtype)


def fake_quantize(w, bits: int):
  """Q(w) (module docstring) with the official gradients: straight through the rounding,
  through the mean and the std; identity where the std is 0."""
  w32 = jnp.asarray(w, jnp.float32)
  mean, std = _statistics(w32)
  out = round_to_codes((w32 - mean) / (std + EPS), bits) * std + mean
  constant = jax.lax.stop_gradient(mean) + (w32 - jax.lax.stop_gradient(w32))
  return jnp.where(std > 0, out, constant).astype(w.dtype)


@jax.tree_util.register_pytree_with_keys_class
class Quantized:
  """A tensor as stored: uint8 `codes` (its shape) with float32 `mean` and `std`."""

  def __init__(self, codes, mean, std, bits: int, dtype=jnp.float32):
    self.codes, self.mean, self.std = codes, mean, std
    self.bits, self.dtype = bits, jnp.dtype(dtype)

  @property
  def shape(self):
    return tuple(np.shape(self.codes))

  def dequantize(self):
    return dequantize(self.codes, self.mean, self.std, self.bits, self.dtype)

  def tree_flatten_with_keys(self):
    keys = jax.tree_util.GetAttrKey
    return (((keys('codes'), self.codes), (keys('mean'), self.mean), (keys('std'), self.std)),
            (self.bits, self.dtype))

  def tree_flatten(self):
    return (self.codes, self.mean, self.std), (self.bits, self.dtype)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  def __repr__(self):
    return f'Quantized({self.bits}-bit, shape={self.shape}, dtype={self.dtype.name})'


def _is_quantized(x) -> bool:
  return isinstance(x, Quantized)


def dequantized(state):
  """`state` with every `Quantized` leaf (a loaded file's) as its float tensor."""
  return jax.tree.map(lambda x: x.dequantize() if _is_quantized(x) else x, state,
                      is_leaf=_is_quantized)


def _leaf_paths(state) -> tuple[list[str], list, object]:
  flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_quantized)
  return [P.path_str(k) for k, _ in flat], [x for _, x in flat], treedef


def low_precision(adapter, bits: int = 1, *, leaves=None, init_scale: float = 1e-3) -> Adapter:
  """The method `adapter` with its state's weights quantised to `bits` (Jie et al., 2023).

  Args:
    adapter: the wrapped method: an `Adapter`, or its config (as `from_config` takes it).
    bits: 1, 2, 4 or 8 bits per entry.
    leaves: regexes searched in the slash paths of the state's leaves (e.g.
      `encoder/layer_0/attention/output/up`) choosing the tensors to quantise; default:
      every leaf of two or more dimensions. Each must be floating point.
    init_scale: std of the truncated normal (within +-2 std) that replaces every chosen leaf
      the wrapped `init` leaves constant (the official start of up projections); 0 keeps it.

  Returns:
    An `Adapter` with the wrapped method's `init` (up to `init_scale`), state, `loss`, `tx`
      and `unmerge`; `apply` runs the chosen tensors as Q(w), straight-through in training,
      and its `codec` stores them as packed codes.

  Raises:
    ValueError: bits not in `BITS`; a method that has its own file encoding (a `codec`); a
      chosen leaf that is not floating point; a state with nothing to quantise.

  Example:
    adapter = pj.low_precision(pj.bottleneck_adapter(r'layer_\\d+/output$', 32), bits=1)

  References:
    Jie, Wang & Deng, "Revisiting the Parameter Efficiency of Adapters from the Perspective
    of Precision Redundancy", ICCV 2023, arXiv:2307.16867.
  """
  check_bits(bits)
  if isinstance(adapter, dict):
    from peftjax.methods import from_config  # pylint: disable=g-import-not-at-top
    adapter = from_config(adapter)
  inner = adapter
  name = inner.config.get('method')
  if inner.codec is not None:
    raise ValueError(f'low_precision stores the state as quantised codes, but method {name!r} '
                     'has its own encoding in adapter files (a codec); wrap a method without one')
  if not init_scale >= 0:
    raise ValueError(f'low_precision init_scale must be >= 0, got {init_scale}')
  config = {'method': 'low_precision', 'adapter': inner.config, 'bits': bits,
            'leaves': None if leaves is None else [leaves] if isinstance(leaves, str)
            else list(leaves), 'init_scale': float(init_scale)}

  def chosen(state) -> list[bool]:
    """Which leaves of `state` (in flattening order) are quantised; checks their dtypes."""
    paths, values, _ = _leaf_paths(state)
    if config['leaves'] is None:
      picked = {p for p, x in zip(paths, values) if _is_quantized(x) or np.ndim(x) >= 2}
    else:
      picked = set(P.select(paths, config['leaves'], what='state leaf'))
    if not picked:
      shapes = {p: tuple(np.shape(x)) for p, x in list(zip(paths, values))[:4]}
      raise ValueError(f'low_precision finds no state leaf of two or more dimensions to '
                       f'quantise in method {name!r} (its leaves: {shapes or "none"}); choose '
                       'them with leaves=[regex]')
    for p, x in zip(paths, values):
      if p in picked and not _is_quantized(x) and not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f'low_precision quantises floating-point weights, but the state leaf '
                         f'{p} of method {name!r} is {x.dtype}')
    return [p in picked for p in paths]

  def weights(state):
    """The state the wrapped method runs with: the chosen leaves as Q(w)."""
    _, values, treedef = _leaf_paths(state)
    out = [x.dequantize() if _is_quantized(x) else fake_quantize(x, bits) if pick else x
           for x, pick in zip(values, chosen(state))]
    return jax.tree.unflatten(treedef, out)

  def init(rng, params, *, calib=None):
    frozen, state = inner.init(rng, params, calib=calib)
    if init_scale > 0:
      _, values, treedef = _leaf_paths(state)
      keys = jax.random.split(jax.random.fold_in(rng, 1), max(len(values), 1))
      values = [_start(k, x, init_scale) if pick and _constant(x) else x
                for k, x, pick in zip(keys, values, chosen(state))]
      state = jax.tree.unflatten(treedef, values)
    else:
      chosen(state)
    return frozen, state

  def encode(state):
    _, values, treedef = _leaf_paths(state)
    out = []
    for x, pick in zip(values, chosen(state)):
      if pick:
        q = x if _is_quantized(x) else Quantized(*quantize(x, bits), bits, x.dtype)
        x = {'codes': packing.pack(np.asarray(q.codes), bits),
             'mean': np.asarray(q.mean, np.float32), 'std': np.asarray(q.std, np.float32)}
      out.append(x)
    return jax.tree.unflatten(treedef, out)

  def decode(stored, template):
    paths, values, treedef = _leaf_paths(template)
    flat = P.flatten(stored)
    out = []
    for p, x, pick in zip(paths, values, chosen(template)):
      if pick:
        codes = packing.unpack(flat[f'{p}{P.SEP}codes'], bits, int(np.size(x)))
        x = Quantized(jnp.asarray(codes.reshape(np.shape(x))), jnp.asarray(
            flat[f'{p}{P.SEP}mean'], jnp.float32), jnp.asarray(flat[f'{p}{P.SEP}std'],
                                                               jnp.float32), bits, x.dtype)
      else:
        x = flat[p]
      out.append(x)
    return jax.tree.unflatten(treedef, out)

  def describe(frozen, state):
    rows = describe_targets(inner, frozen, dequantized(state))
    return {p: {**row, 'bits': bits} for p, row in rows.items()}

  guide = None
  if inner.guide is not None:
    guide = inner.guide._replace(
        reference=lambda frozen, state: inner.guide.reference(frozen, weights(state)))
  return Adapter(
      init=init, apply=lambda frozen, state: inner.apply(frozen, weights(state)),
      config=config,
      loss=None if inner.loss is None else lambda state: inner.loss(dequantized(state)),
      tx=inner.tx,
      unmerge=None if inner.unmerge is None else (
          lambda merged, state: inner.unmerge(merged, weights(state))),
      describe=describe, codec=Codec(encode, decode), guide=guide)


def _constant(x) -> bool:
  x = np.asarray(x)
  return x.size > 0 and bool(np.all(x == x.flat[0]))


def _start(key, x, scale: float):
  return (jax.random.truncated_normal(key, -2.0, 2.0, np.shape(x)) * scale).astype(x.dtype)
