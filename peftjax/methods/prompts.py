"""Prompt tokens prepended to the input of targeted blocks of any Flax Linen model.

VPT: "Visual Prompt Tuning" (Jia et al., ECCV 2022, arXiv:2203.12119; github.com/KMnP/vpt).
DVPT: "DVPT: Dynamic Visual Prompt Tuning of Large Pre-trained Models for Medical Image
Analysis" (He et al., 2023, arXiv:2307.09787; github.com/NKUhealong/DVPT).

A targeted module is a block mapping tokens [..., L, D] (its first positional argument) to
tokens [..., L, D']. `apply` places a `Prompts` among the block's own params; the interceptor
(`peftjax.core.linen`) then runs the block on [p_1..p_P, x_1..x_L] and removes the P prompt
positions from its output, so the model around the block sees the length it always saw:

  VPT-deep:     target every block (`encoder/layer_\\d+$`): a fresh set per block, the
                previous block's prompt outputs dropped (the paper's Eq. 2, replacing them).
  VPT-shallow:  target the module that runs the blocks (`encoder$`): prompts enter before the
                first block, pass through every block, and leave at the encoder's output.

So pooling never sees a prompt: a class token stays first (VPT pools it), and the bundled
ViT's mean pooling averages the image tokens alone (the official `img_pool`). Blocks that take
a per-token attention mask [..., L] name it (`mask`: its position among the call's arguments,
or its keyword); it is extended with ones, so that every token attends to the prompts and the
prompts to every unmasked token. A block with such an argument left unnamed is an error.

Deviations from the official code: prompts go first, before a class token, not after it
(self-attention without positional bias is equivariant to the order, and the prompts carry no
position embedding, so the outputs are the same; a causal block would see the difference);
the prompt projection (`PROJECT`) is not offered. DVPT: see `dvpt`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.core import paths as P
from peftjax.core.adapter import Adapter
from peftjax.core.bottleneck import ACTIVATIONS, Inserted
from peftjax.core.dropout import dropout as drop
from peftjax.methods.adapters import projections
from peftjax.methods.common import module_paths, target_list

KEY = 'prompts'  # the key of the inserted prompts in the block's params


@jax.tree_util.register_pytree_with_keys_class
class Prompts(Inserted):
  """P static prompt tokens `tokens` (P, D), with prompt dropout at `rate` in training."""
  children = ('tokens',)

  def __init__(self, tokens, mask=None, rate: float = 0.0):
    self.tokens, self.mask, self.rate = tokens, mask, float(rate)

  @property
  def stochastic(self):
    return self.rate > 0

  def _aux(self):
    return self.mask, self.rate

  def tree_flatten(self):
    return tuple(getattr(self, k) for k in self.children), self._aux()

  def tree_flatten_with_keys(self):
    return (tuple((jax.tree_util.GetAttrKey(k), getattr(self, k)) for k in self.children),
            self._aux())

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def width(self) -> int:
    return self.tokens.shape[-1]

  def prompts(self, x):
    """The prompt tokens for the block's input x [..., L, D]: [..., P, D]."""
    return jnp.broadcast_to(self.tokens.astype(x.dtype), (*x.shape[:-2], *self.tokens.shape))

  def wrap(self, call, args, kwargs, draw=lambda: None, where: str = 'module'):
    x = args[0]
    if not isinstance(x, jax.Array) or x.ndim < 2 or x.shape[-1] != self.width:
      raise ValueError(f'{where}: prompts of width {self.width} go before tokens [..., L, '
                       f'{self.width}] (the first argument of a block), but this module is '
                       f'called with {_shape(x)}; target a block of the model (e.g. '
                       r'encoder/layer_\d+$, or encoder$ for VPT-shallow)')
    args, kwargs = _with_prompt_mask(args, kwargs, self.mask, x.shape[:-1], self.length, where)
    prompts = self.prompts(x)
    rng = draw() if self.stochastic else None
    if rng is not None:
      prompts = drop(rng, prompts, self.rate)
    y = call(jnp.concatenate([prompts, x], axis=-2), *args[1:], **kwargs)
    if not isinstance(y, jax.Array) or y.shape[:-1] != (*x.shape[:-2], x.shape[-2] + self.length):
      raise ValueError(f'{where}: a prompted block maps tokens [..., L, D] to tokens [..., L, '
                       f"D']; with {self.length} prompts it maps {x.shape[:-2]} + "
                       f'({x.shape[-2] + self.length}, {x.shape[-1]}) to {_shape(y)}')
    return y[..., self.length:, :]

  @property
  def length(self) -> int:
    return self.tokens.shape[-2]

  def __repr__(self):
    return f'{type(self).__name__}({self.length} x {self.width}, mask={self.mask!r})'


@jax.tree_util.register_pytree_with_keys_class
class DynamicPrompts(Prompts):
  """DVPT's prompts: P learnable queries (P, r) attend over the block's input tokens in a
  bottleneck, A = softmax(Q act(x down + b_d)ᵀ / sqrt(r)), prompts = A act(x down + b_d) up
  + b_u (module docstring of `dvpt`)."""
  children = ('tokens', 'down', 'down_bias', 'up', 'up_bias')

  def __init__(self, tokens, down, down_bias, up, up_bias, mask=None, rate: float = 0.0,
               activation: str = 'gelu'):
    super().__init__(tokens, mask, rate)
    self.down, self.down_bias, self.up, self.up_bias = down, down_bias, up, up_bias
    self.activation = activation

  def _aux(self):
    return (*super()._aux(), self.activation)

  @property
  def width(self) -> int:
    return self.down.shape[0]

  def prompts(self, x):
    dtype = x.dtype
    h = ACTIVATIONS[self.activation](x @ self.down.astype(dtype) + self.down_bias.astype(dtype))
    scores = jnp.einsum('pr,...lr->...pl', self.tokens.astype(dtype), h)
    weights = jax.nn.softmax(scores.astype(jnp.float32) / math.sqrt(h.shape[-1]), axis=-1)
    return (weights.astype(dtype) @ h) @ self.up.astype(dtype) + self.up_bias.astype(dtype)


def _shape(x):
  return tuple(x.shape) if hasattr(x, 'shape') else type(x).__name__


def _with_prompt_mask(args, kwargs, mask, tokens_shape, length, where):
  """The call's arguments with its attention mask [..., L] (named by `mask`) extended by
  `length` ones in front (`mask_argument`)."""
  key = mask_argument(args, kwargs, mask, tokens_shape, where)
  args, kwargs = list(args), dict(kwargs)
  if key is None:
    return args, kwargs
  holder = args if isinstance(key, int) else kwargs
  m = holder[key]
  ones = jnp.ones((*m.shape[:-1], length), m.dtype)
  holder[key] = jnp.concatenate([ones, m], axis=-1)
  return args, kwargs


def mask_argument(args, kwargs, mask, tokens_shape, where) -> int | str | None:
  """Where a module call takes its per-token attention mask [..., L]: `mask` (a position
  among the call's arguments or a keyword), checked; None where `mask` is None.

  Raises:
    ValueError: `mask` names no argument or one of another shape than `tokens_shape`, or
      `mask` is None while an argument has that shape (an unnamed mask).
  """
  named = [(i, a) for i, a in enumerate(args) if i] + list(kwargs.items())
  if mask is None:
    for name, a in named:
      if getattr(a, 'shape', None) == tuple(tokens_shape):
        raise ValueError(f'{where}: the block also takes an argument of shape {a.shape} (at '
                         f'{name!r}), one per token, e.g. an attention mask; give its position '
                         f'or keyword as mask=')
    return None
  if (isinstance(mask, int) and not 0 < mask < len(args)) or (
      isinstance(mask, str) and mask not in kwargs):
    raise ValueError(f'{where}: mask={mask!r} names no argument of the block call (it has '
                     f'{len(args)} positional and keywords {sorted(kwargs)})')
  m = (args if isinstance(mask, int) else kwargs)[mask]
  if getattr(m, 'shape', None) != tuple(tokens_shape):
    raise ValueError(f'{where}: the mask at {mask!r} should have one entry per token, shape '
                     f'{tuple(tokens_shape)}; got {_shape(m)}')
  return mask


def check_mask(name, mask):
  if mask is not None and not isinstance(mask, (int, str)):
    raise ValueError(f'{name} mask must be a position (int) or keyword (str), got {mask!r}')


def _check(name, length, mask, rate):
  check_mask(name, mask)
  if not (isinstance(length, int) and not isinstance(length, bool) and length >= 0):
    raise ValueError(f'{name} prompt length must be an int >= 0, got {length!r}')
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'{name} prompt dropout must be in [0, 1), got {rate!r}')


def _blocks(params, targets, width):
  """`{block path: token width}` for the modules the targets find: `width`, or else the input
  width of the first 2-D kernel among the block's params (its own, or e.g. a transformer
  block's first attention projection); a wrong guess fails at the call, naming the block."""
  flat = P.flatten(params)
  modules = module_paths(flat)
  out = {}
  for path in P.select(modules, targets, what='module'):
    own = flat.get(f'{path}{P.SEP}kernel')
    kernels = [v for p, v in flat.items() if p.startswith(path + P.SEP) and np.ndim(v) == 2]
    if width is None and not kernels:
      raise ValueError(f'cannot tell the token width of block {path} from its params (no 2-D '
                       f'kernel in it); give width=')
    out[path] = int(width if width is not None else
                    (own if np.ndim(own) == 2 else kernels[0]).shape[0])
  return out


def _inserting(config: dict, make_entry, make_leaf, shared_key=None) -> Adapter:
  """A method placing `make_leaf(entry)` under `KEY` in each block the targets find, each
  entry `make_entry(key, token width, params)`; with `shared_key`, one entry (under that
  key) serves every block."""

  def init(rng, params, *, calib=None):
    del calib
    blocks = _blocks(params, config['targets'], config['width'])
    if shared_key is not None:
      widths = set(blocks.values())
      if len(widths) != 1:
        raise ValueError(f'shared prompts serve blocks of one token width; these have '
                         f'{ {p: d for p, d in blocks.items()} }')
      return params, {shared_key: make_entry(rng, widths.pop(), params)}
    keys = jax.random.split(rng, len(blocks))
    return params, {p: make_entry(k, d, params) for k, (p, d) in zip(keys, blocks.items())}

  def apply(frozen, state):
    flat = P.flatten(frozen)
    paths = (list(_blocks(frozen, config['targets'], config['width']))
             if shared_key is not None else list(state))
    for path in paths:
      flat[f'{path}{P.SEP}{KEY}'] = make_leaf(state[shared_key if shared_key else path])
    return P.unflatten(flat)

  return Adapter(init=init, apply=apply, config=config)


def vpt(targets, length: int = 10, *, width: int | None = None, fan_in: int | str | None = None,
        dropout: float = 0.0, mask: int | str | None = None) -> Adapter:
  """VPT (Jia et al., 2022): P learned prompt tokens before each targeted block.

  Args:
    targets: regexes of block paths: every block for VPT-deep (`encoder/layer_\\d+$`), the
      module running the blocks for VPT-shallow (`encoder$`); module docstring.
    length: P, the number of prompt tokens (0: the model unchanged).
    width: the blocks' token width D (default: the input width of the block's first 2-D
      kernel, e.g. its attention's query projection).
    fan_in: the prompts are drawn from U(±sqrt(6 / (fan_in + D))), the official code's
      xavier-uniform bound over the patch projection (fan_in = channels · patch²): an int, or
      a regex naming the patch projection's 2-D kernel (`embeddings/patch/kernel$`), whose
      input width is taken; None: D (xavier over a D x D map, for models without patches).
    dropout: prompt dropout in training (the official `PROMPT.DROPOUT`).
    mask: where the blocks take a per-token attention mask: its position among the block
      call's arguments (1 for the bundled BERT's layers and encoder) or its keyword.

  Returns:
    An `Adapter` with state `{block path: {'tokens': (P, D)}}`; no merged tree.

  Example:
    deep = pj.vpt(r'encoder/layer_\\d+$', 10, width=64, fan_in='embeddings/patch/kernel$')

  References:
    Jia et al., "Visual Prompt Tuning", ECCV 2022, arXiv:2203.12119.
  """
  _check('VPT', length, mask, dropout)
  config = dict(method='vpt', targets=target_list(targets), length=length, width=width,
                fan_in=fan_in, dropout=float(dropout), mask=mask)

  def make_entry(key, d, params):
    bound = math.sqrt(6.0 / (_fan_in(params, fan_in, d) + d))
    return {'tokens': jax.random.uniform(key, (length, d), jnp.float32, -bound, bound)}

  return _inserting(config, make_entry, lambda e: Prompts(e['tokens'], mask, dropout))


def _fan_in(params, fan_in, d) -> int:
  if fan_in is None:
    return d
  if isinstance(fan_in, int):
    return fan_in
  flat = P.flatten(params)
  found = P.select(flat, [fan_in])
  if len(found) != 1 or np.ndim(flat[found[0]]) != 2:
    raise ValueError(f'fan_in={fan_in!r} should name one 2-D kernel, the patch projection '
                     f'(channels · patch², D); it names {found}')
  return int(flat[found[0]].shape[0])


def dvpt(targets, length: int = 10, size: int = 20, *, shared: bool = False,
         width: int | None = None, activation: str = 'gelu', dropout: float = 0.0,
         mask: int | str | None = None) -> Adapter:
  """DVPT (He et al., 2023): prompts that learnable queries draw from each block's tokens.

  At a targeted block with input tokens x [..., L, D]: h = act(x down + b_d) [..., L, r] (the
  bottleneck), A = softmax(Q hᵀ / sqrt(r)) [..., P, L] (the P learnable queries Q (P, r)
  attending over the tokens), prompts = A h up + b_u [..., P, D]; the sample-specific prompts
  enter the block as VPT-deep's do (module docstring). With `shared`, one module (Q, down, up)
  serves every targeted block (the paper's cross-layer sharing; the official code shares one
  per three layers: target those blocks).

  Deviation: the official code (`model.py`) keeps P static prompt tokens in the token stream
  and adds a gated bottleneck to each block's MLP branch, whose cross-attention output it
  computes but leaves unused; here the queries' cross-attention output is the prompt, as the
  paper describes. `up` and `b_u` start at zero (the prompts start as zero tokens), `down` as
  torch's `nn.Linear`, Q as VPT's prompts (xavier over (P, r)).

  Args:
    targets, width, dropout, mask: as `vpt` (`encoder/layer_\\d+$` for every block).
    length: P, the number of queries and prompts.
    size: r, the bottleneck width (the official code: 20).
    shared: one module for all targeted blocks (state under 'shared').
    activation: of the bottleneck (`peftjax.core.bottleneck.ACTIVATIONS`).

  Returns:
    An `Adapter` with state `{block path (or 'shared'): {'tokens' (P, r), 'down', 'down_bias',
      'up', 'up_bias'}}`; no merged tree.

  References:
    He et al., "DVPT: Dynamic Visual Prompt Tuning of Large Pre-trained Models for
    Medical Image Analysis", 2023, arXiv:2307.09787.
  """
  _check('DVPT', length, mask, dropout)
  if activation not in ACTIVATIONS:
    raise ValueError(f'DVPT activation {activation!r}; expected one of {sorted(ACTIVATIONS)}')
  if not (isinstance(size, int) and size > 0):
    raise ValueError(f'DVPT bottleneck size must be a positive int, got {size!r}')
  config = dict(method='dvpt', targets=target_list(targets), length=length, size=size,
                shared=bool(shared), width=width, activation=activation,
                dropout=float(dropout), mask=mask)

  def make_entry(key, d, params):
    del params
    k_query, k_proj = jax.random.split(key)
    bound = math.sqrt(6.0 / (length + size))
    down, up = projections(k_proj, d, size, d, 'zero_up', 0.0)
    return {'tokens': jax.random.uniform(k_query, (length, size), jnp.float32, -bound, bound),
            'down': down, 'down_bias': jnp.zeros((size,), jnp.float32),
            'up': up, 'up_bias': jnp.zeros((d,), jnp.float32)}

  def make_leaf(e):
    return DynamicPrompts(e['tokens'], e['down'], e['down_bias'], e['up'], e['up_bias'], mask,
                          dropout, activation)

  return _inserting(config, make_entry, make_leaf, 'shared' if shared else None)
