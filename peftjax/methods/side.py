"""Side tuning: a small parallel network reading a frozen model's detached features.

UniPT: "UniPT: Universal Parallel Tuning for Transfer Learning with Efficient Parameter and
Memory" (Diao et al., CVPR 2024, arXiv:2308.14316; github.com/Paranioar/UniPT). Hierarchical
Side-Tuning: "Hierarchical Side-Tuning for Vision Transformers" (Lin et al., 2023,
arXiv:2310.05393). Both train only a network beside the backbone that is fed the backbone's
intermediate activations; no gradient flows through the backbone, so its activations are not
kept for a backward pass.

The method taps the outputs h_1..h_N of the targeted modules (e.g. every transformer block,
`encoder/layer_\\d+$`) and fuses the side network's result into the output y of one `output`
module (e.g. the encoder, `encoder$`, whose tokens the task's pooling and head read). Every
feature enters through `jax.lax.stop_gradient`. With tokens [..., L, D] and the attention
mask m [..., L] of the output module's call (ones without one), UniPT's equations (the
official VSE-infty `Our_tuning_for_transformer`):

  t_i = LN_i(h_i W_i + b_i)                          each tap's low-dim projection [..., L, r]
  a   = LN_a(y W_a + b_a)                            the anchor: the output's own features
  A_i = l1norm(relu(a t_iᵀ ⊙ m)) + I,  u_i = A_i t_i   parallel interaction (rows of A_i over
                                                      the unmasked tokens, plus the identity)
  c_i = w_g · (pool(a) ⊙ pool(t_i)) + b_g,  p = softmax_i(c)   confidence aggregation
  z   = a + LN_p((Σ_i p_i u_i) W_p + b_p)
  s   = relu(z) W_u + b_u                            [..., L, D]
  out = y + s  (fusion='residual')  or  s  (fusion='replace')

with pool the mean over the unmasked tokens. `apply` places a `SideTap` (W_i, b_i, LN_i)
among each targeted module's params and a `SideOutput` (the rest) among the output module's;
the interceptor (`peftjax.core.linen`, inside `structured_layers()`) runs them around the
modules' calls, the model's code unchanged: each tap leaves t_i in the apply's shared dict
(`linen.shared()`), and the output module, once its call returns, reads them. A tap must run
before the output module returns, inside it (blocks inside an encoder) or before it, and not
inside a lifted transform (`nn.remat`, `nn.scan`: run the model without remat, which side
tuning does not need). No tree of weights computes a side network: `pj.merge` raises
`NotMergeableError`.

Deviations from the official code:
- The fusion: VSE-infty replaces the output by s (`fusion='replace'`); the default,
  `fusion='residual'`, adds s to the detached output as the official CLIP4Clip variant does,
  and with `init='zero_up'` (W_u, b_u zero) the model's output at init is the base output
  exactly. `init='uniform'` draws W_u like the other weights.
- The anchor is the output module's own output y, projected by its own W_a (CLIP4Clip's
  `raw_anchor_features`); VSE-infty takes the last of the 13 hidden states and merges the
  other 12. Target every block here and y (the last block's output, or its norm) is both the
  anchor and, through its own tap, among the merged features, as in CLIP4Clip.
- Weights as torch's `nn.Linear` (U(±1/sqrt(fan_in))) but biases zero; LN scale one, bias
  zero (eps 1e-5). The tap's features are the module's outputs, not HF's `hidden_states`
  (which also hold the embeddings: target `embeddings$` for them).
- Hierarchical Side-Tuning's side network (meta tokens, adaptive feature bridges, a side
  transformer) is not offered; it shares the principle (a side network fed detached
  intermediate activations), which this method implements with UniPT's modules.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.core import linen
from peftjax.core import paths as P
from peftjax.core.adapter import Adapter
from peftjax.core.bottleneck import Inserted
from peftjax.methods.adapters import check_size
from peftjax.methods.common import linear_init, module_paths, target_list
from peftjax.methods.prompts import check_mask, mask_argument

KEY = 'side'  # the key of the tap or output module in its host module's params
FUSIONS = ('residual', 'replace')
INITS = ('zero_up', 'uniform')
TAP_KEYS = ('down', 'down_bias', 'norm_scale', 'norm_bias')
OUTPUT_KEYS = TAP_KEYS + ('gate', 'gate_bias', 'proj', 'proj_bias', 'proj_norm_scale',
                          'proj_norm_bias', 'up', 'up_bias')
_EPS_NORM, _EPS_L1 = 1e-5, 1e-6  # torch's LayerNorm eps; the official l1norm's


class _Side(Inserted):
  """A pytree of the arrays `children` (dict keys) and static fields `static`."""
  children: tuple = ()
  static: tuple = ()

  def __init__(self, weights: dict, *aux):
    self.weights = dict(weights)
    for name, value in zip(self.static, aux):
      setattr(self, name, value)

  def tree_flatten(self):
    return tuple(self.weights[k] for k in self.children), self._aux()

  def tree_flatten_with_keys(self):  # key paths end in the weights' names
    return (tuple((jax.tree_util.GetAttrKey(k), self.weights[k]) for k in self.children),
            self._aux())

  def _aux(self):
    return tuple(getattr(self, name) for name in self.static)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(dict(zip(cls.children, children)), *aux)

  def project(self, h, prefix: str = ''):
    """LN(sg(h) W + b) of features h [..., L, width] in h's dtype (statistics in float32)."""
    w = self.weights
    dtype = h.dtype
    u = jax.lax.stop_gradient(h) @ w[prefix + 'down'].astype(dtype) + w[
        prefix + 'down_bias'].astype(dtype)
    return _norm(u, w[prefix + 'norm_scale'], w[prefix + 'norm_bias'])


def _norm(u, scale, bias):
  x = u.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  x = (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + _EPS_NORM)
  return (x * scale + bias).astype(u.dtype)


def _store(output: str) -> dict:
  return linen.shared().setdefault((KEY, output), {})


def _check_array(y, where: str, what: str):
  if not isinstance(y, jax.Array) or y.ndim < 2:
    raise TypeError(f'{where}: the side network reads {what} tokens [..., L, D] (an array of '
                    f'2 or more dims); this module returns '
                    f'{getattr(y, "shape", type(y).__name__)}')


@jax.tree_util.register_pytree_with_keys_class
class SideTap(_Side):
  """Projects its host module's detached output to the side network's width and leaves it
  for the output module (module docstring)."""
  children = TAP_KEYS
  static = ('path', 'output')

  def wrap(self, call, args, kwargs, draw=lambda: None, where: str = 'module'):
    y = call(*args, **kwargs)
    _check_array(y, where, "a tapped module's")
    if y.shape[-1] != self.weights['down'].shape[0]:
      raise ValueError(f'{where}: the side network reads its output of width '
                       f'{self.weights["down"].shape[0]}, but it returns {y.shape}; give the '
                       f'method the output width of this module (widths={{regex: width}})')
    store = _store(self.output)
    if self.path in store:
      raise ValueError(f'{where} ran twice in one apply; the side network reads one call of '
                       'each tapped module')
    store[self.path] = self.project(y)
    return y

  def __repr__(self):
    return (f'{type(self).__name__}({self.weights["down"].shape[0]}->'
            f'{self.weights["down"].shape[1]}, to {self.output})')


@jax.tree_util.register_pytree_with_keys_class
class SideOutput(_Side):
  """The side network proper: reads the taps' features and its host's detached output and
  gives the host's output with the side network's fused in (module docstring)."""
  children = OUTPUT_KEYS
  static = ('path', 'taps', 'fusion', 'mask')

  def wrap(self, call, args, kwargs, draw=lambda: None, where: str = 'module'):
    x = args[0]
    tokens = x.shape[:-1] if isinstance(x, jax.Array) and x.ndim >= 2 else None
    key = mask_argument(args, kwargs, self.mask, tokens, where)
    mask = None if key is None else (args if isinstance(key, int) else kwargs)[key]
    y = call(*args, **kwargs)
    _check_array(y, where, "its output module's")
    found = linen.shared().pop((KEY, self.path), {})
    missing = [p for p in self.taps if p not in found]
    if missing:
      raise ValueError(
          f'{where}: the side network reads {", ".join(missing)}, which did not run before '
          f'this module returned (in this apply, outside lifted transforms such as nn.remat); '
          'target modules that run inside or before the output module, without remat')
    for path in self.taps:
      if found[path].shape[:-1] != y.shape[:-1]:
        raise ValueError(f'{where}: the side network merges tokens of one shape, but {path} '
                         f'gives {found[path].shape[:-1]} and this module {y.shape[:-1]}')
    if mask is not None and mask.shape != y.shape[:-1]:
      raise ValueError(f'{where}: the mask at {key!r} has shape {mask.shape}, the output '
                       f'tokens {y.shape[:-1]}')
    return self(y, [found[p] for p in self.taps], mask, where)

  def __call__(self, y, features, mask=None, where: str = 'module'):
    """The fused output for the host's output y [..., L, D] and the taps' features."""
    w = self.weights
    if y.shape[-1] != w['down'].shape[0]:
      raise ValueError(f'{where}: the side network reads and adds to an output of width '
                       f'{w["down"].shape[0]}, but this module returns {y.shape}; give the '
                       f'method its output width (widths={{regex: width}})')
    dtype = y.dtype
    m = (jnp.ones(y.shape[:-1], jnp.float32) if mask is None
         else jnp.asarray(mask, jnp.float32))
    pool = lambda u: ((u.astype(jnp.float32) * m[..., None]).sum(-2)
                      / jnp.maximum(m.sum(-1, keepdims=True), 1.0))
    a = self.project(y)
    anchor = pool(a)
    merged, confidence = [], []
    for t in features:
      scores = jax.nn.relu(jnp.einsum('...qr,...kr->...qk', a, t).astype(jnp.float32)
                           * m[..., None, :])
      attn = scores / jnp.maximum(scores.sum(-1, keepdims=True), _EPS_L1)
      merged.append(attn.astype(dtype) @ t + t)  # (A + I) t
      confidence.append((anchor * pool(t)) @ w['gate'] + w['gate_bias'])  # [..., 1]
    p = jax.nn.softmax(jnp.concatenate(confidence, -1), -1).astype(dtype)  # [..., N]
    u = jnp.einsum('n...lr,...n->...lr', jnp.stack(merged), p)
    u = u @ w['proj'].astype(dtype) + w['proj_bias'].astype(dtype)
    z = a + _norm(u, w['proj_norm_scale'], w['proj_norm_bias'])
    s = jax.nn.relu(z) @ w['up'].astype(dtype) + w['up_bias'].astype(dtype)
    return jax.lax.stop_gradient(y) + s if self.fusion == 'residual' else s

  def __repr__(self):
    return (f'{type(self).__name__}({len(self.taps)} taps, {self.weights["down"].shape[0]}->'
            f'{self.weights["down"].shape[1]}, {self.fusion})')


def output_widths(params, targets, widths: dict | None = None, *,
                  what: str = 'module') -> dict[str, int]:
  """`{module path: output width}` for the modules a regex of `targets` finds: from
  `widths` (`{regex: width}`, first match), else the module's own 2-D `kernel` (in, out),
  else the input width of the first 2-D kernel inside it (a block that keeps the width of
  its tokens, as a transformer block does; a wrong guess fails at the call, naming it).

  Raises:
    PatternError: a target pattern that matches no module.
    ValueError: a module whose width is unknown, or that already holds a side module.
  """
  flat = P.flatten(params)
  modules = module_paths(flat)
  chosen = P.select(modules, targets, what=what)
  out = {}
  for path in chosen:
    if f'{path}{P.SEP}{KEY}' in flat:
      raise ValueError(f'{path} already holds {KEY!r} in its params (one side module per '
                       'module)')
    given = P.first_match(path, widths, None)
    own = flat.get(f'{path}{P.SEP}kernel')
    inside = [v for p, v in flat.items() if p.startswith(path + P.SEP) and np.ndim(v) == 2]
    if given is None and np.ndim(own) != 2 and not inside:
      raise ValueError(f'cannot tell the output width of module {path} from its params (no 2-D '
                       f'kernel in it); give widths={{{path!r}: width}}')
    out[path] = int(given if given is not None else
                    own.shape[1] if np.ndim(own) == 2 else inside[0].shape[0])
  return out


def _projection(key, width: int, size: int) -> dict:
  return {'down': linear_init(key, (width, size), width),
          'down_bias': jnp.zeros((size,), jnp.float32),
          'norm_scale': jnp.ones((size,), jnp.float32),
          'norm_bias': jnp.zeros((size,), jnp.float32)}


def side(targets, output: str, size: int = 64, *, fusion: str = 'residual',
         init: str = 'zero_up', mask: int | str | None = None,
         widths: dict | None = None) -> Adapter:
  """Side tuning (UniPT, Diao et al., 2024; Hierarchical Side-Tuning, Lin et al., 2023).

  Args:
    targets: regexes of the module paths whose outputs the side network reads (each the
      tokens [..., L, D_i] of one call per apply), e.g. every block: `encoder/layer_\\d+$`.
    output: a regex naming the one module whose output [..., L, D] the side network reads as
      its anchor and fuses into, e.g. `encoder$`; the targets run inside or before it.
    size: r, the side network's width (the official `embed_size // downsample_D_factor`).
    fusion: 'residual' (the output plus the side network's) or 'replace' (the side
      network's alone); module docstring.
    init: 'zero_up' (the up projection zero: at init the model's output is the base output,
      with fusion='residual') or 'uniform' (as the official code: torch's default).
    mask: where the output module's call takes its per-token attention mask [..., L] (its
      position among the arguments, 1 for the bundled BERT's `encoder`, or its keyword),
      which the cross-attention and pooling use; None: every token counts.
    widths: `{regex: width}`: the output width of modules whose params do not tell it.

  Returns:
    An `Adapter` with state `{tap path: {'down', 'down_bias', 'norm_scale', 'norm_bias'},
      output path: {those, 'gate', 'gate_bias', 'proj', 'proj_bias', 'proj_norm_scale',
      'proj_norm_bias', 'up', 'up_bias'}}`; no merged tree (`pj.merge` raises
      `NotMergeableError`) and no `unmerge`.

  Raises:
    ValueError: an unknown fusion or init, a bad size or mask, an output pattern that does
      not name exactly one module, or a target that is (or holds) the output module.

  Example:
    adapter = pj.side(r'encoder/layer_\\d+$', output='encoder$', size=64, mask=1)  # BERT
  """
  if fusion not in FUSIONS:
    raise ValueError(f'side fusion {fusion!r}; expected one of {FUSIONS}')
  if init not in INITS:
    raise ValueError(f'side init {init!r}; expected one of {INITS}')
  if not isinstance(output, str):
    raise ValueError(f'side output must be one regex (str) naming one module, got {output!r}')
  check_size('side network', size)
  check_mask('side', mask)
  config = dict(method='side', targets=target_list(targets), output=output, size=size,
                fusion=fusion, init=init, mask=mask,
                widths={k: int(v) for k, v in (widths or {}).items()})

  def layout(params) -> tuple[dict[str, int], str, int]:
    """`({tap path: width}, output path, output width)`."""
    named = P.select(module_paths(P.flatten(params)), [output], what='module (side output)')
    if len(named) != 1:
      raise ValueError(f'side output={output!r} should name one module; it names {named}')
    ((out_path, out_width),) = output_widths(params, ['^' + re.escape(named[0]) + '$'],
                                             config['widths']).items()
    taps = output_widths(params, config['targets'], config['widths'])
    P.check_overrides([*taps, out_path], config['widths'], 'widths')
    around = [p for p in taps if out_path == p or out_path.startswith(p + P.SEP)]
    if around:
      raise ValueError(f'side targets {around} are (or hold) the output module {out_path}; '
                       'the side network reads modules that return before it does')
    return taps, out_path, out_width

  def init_fn(rng, params, *, calib=None):
    del calib
    taps, out_path, width = layout(params)
    keys = jax.random.split(rng, len(taps) + 1)
    state = {p: _projection(k, d, size) for k, (p, d) in zip(keys[1:], taps.items())}
    k_anchor, k_gate, k_proj, k_up = jax.random.split(keys[0], 4)
    up = (linear_init(k_up, (size, width), size) if init == 'uniform'
          else jnp.zeros((size, width), jnp.float32))
    state[out_path] = {**_projection(k_anchor, width, size),
                       'gate': linear_init(k_gate, (size, 1), size),
                       'gate_bias': jnp.zeros((1,), jnp.float32),
                       'proj': linear_init(k_proj, (size, size), size),
                       'proj_bias': jnp.zeros((size,), jnp.float32),
                       'proj_norm_scale': jnp.ones((size,), jnp.float32),
                       'proj_norm_bias': jnp.zeros((size,), jnp.float32),
                       'up': up, 'up_bias': jnp.zeros((width,), jnp.float32)}
    return params, state

  def apply(frozen, state):
    flat = P.flatten(frozen)
    (out_path,) = [p for p, e in state.items() if set(e) == set(OUTPUT_KEYS)]
    taps = tuple(sorted(p for p in state if p != out_path))  # as a file's state orders them
    for path in taps:
      flat[f'{path}{P.SEP}{KEY}'] = SideTap(state[path], path, out_path)
    flat[f'{out_path}{P.SEP}{KEY}'] = SideOutput(state[out_path], out_path, taps, fusion, mask)
    return P.unflatten(flat)

  def describe(frozen, state):  # shape: [width read, r] of a tap; [width, r] of the output
    del frozen
    return {path: {'shape': [int(e['down'].shape[0]), int(e['down'].shape[1])],
                   'trainable': int(sum(np.size(v) for v in e.values())),
                   'size': int(e['down'].shape[1])}
            for path, e in state.items()}

  return Adapter(init=init_fn, apply=apply, config=config, describe=describe)
