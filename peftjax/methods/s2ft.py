"""S²FT: structured sparse fine-tuning, "select sparsely, compute densely".

S²FT (Yang, Leng, Guo, Zhao, Nakada, Zhang, Yao and Chen, NeurIPS 2024, arXiv:2412.06289;
official code github.com/Infini-AI-Lab/S2FT) selects a few attention heads and FFN channels
per block and co-permutes the weights coupled through them so that each selected part is one
dense sub-matrix, then trains those sub-matrices in place. With query heads in the order π,
key/value heads in the order σ and FFN channels in the order ρ (kernels stored (in, out), a
head being head_dim consecutive columns or rows), `co_permute` makes

  W_q[:, π]  W_k[:, σ]  W_v[:, σ]  (and their biases)    W_o[π, :]
  W_gate[:, ρ]  W_up[:, ρ]  (and the up bias)            W_down[ρ, :]

which leaves the model's function unchanged: attention and the activation act head by head
and channel by channel, and the sum over heads (channels) in W_o (W_down) does not depend on
their order (`inverse=True` restores the tree exactly). The trained updates are

  W_o[rows of the selected heads]          + Δ_o  (k_o·head_dim, hidden)  (official S2RowLinear)
  W_down[rows of the selected channels]    + Δ_d  (k_d, hidden)           (S2RowLinear)
  W_v[:, columns of the selected kv heads] + Δ_v  (hidden, k_v·head_dim)  (S2ColumnLinear)
  W_up[:, columns of the selected channels] + Δ_u (hidden, k_u)           (S2ColumnLinear)

each a `SparseDelta` of rows (axis 0) or columns (axis 1) on the permuted base, so the
backward pass forms only the Δ's (k, hidden) / (hidden, k) gradients and the input
gradients, no frozen weight's gradient, and keeps of a row update's input only its k selected
columns, as the official efficient kernel saves its input's slice (the paper's partial
back-propagation). Only the Δ train; Q, K, gate, biases and the rest stay frozen (official
`only_optimize_s2_parameters`).

Selection, as the official trainer: for each ratio `int(ratio * total)` heads (channels),
drawn uniformly at random over all blocks together (the count per block varies), one draw
per ratio. Within a block the order is: selected for v only, for v and o, for o only, the
rest (each ascending); likewise up / down. So v's (up's) columns are a leading block and
o's (down's) rows a contiguous block after the v-only (up-only) ones: the leading block
`arange(k)` with the defaults (v_ratio = u_ratio = 0). Defaults o_ratio 0.052, d_ratio 0.02
are the official LLaMA-2 scripts' (its LLaMA-3 scripts train d_ratio 0.03 alone).

The merged tree is in the permuted layout, as the official fused model. `decouple` gives the
update in the base's own coordinates: a sparse difference that `sparse.compose` fuses into
the unpermuted base and `sparse.negate` takes off again, to switch between tasks.

Deviations: (1) Grouped-query attention: the official code reorders query heads with an
order over all heads after reshaping them by key/value heads, which holds only when the two
counts are equal (its GQA runs, LLaMA-3, train down_proj alone). Here a key/value head moves
with its group of query heads and query heads reorder within their group (selected o heads
first; groups ordered as above), which keeps the function; the o rows are then one
contiguous block only where the selected heads fill their groups, otherwise whole heads at
sorted positions (still a (k, hidden) update, through `SparseDelta`'s row gather).
(2) The draw is numpy's (from `seed` and the role), not Python's `random.sample`, and depends
on the config and the param shapes alone: loading an adapter file draws it again (and checks
the file's trained positions against it), and `unmerge` / `decouple` redraw it from their
trees. (3) A ratio that selects nothing (`int(ratio * total) == 0`) is an error; the
official trainer then trains nothing there. (4) The blocks' modules come from `layout`
(BERT's and LLaMA's paths are built in), so any model with these coupled structures works.
"""
from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np

from peftjax.core import paths as P
from peftjax.core.adapter import Adapter
from peftjax.core.calib import Restored
from peftjax.core.leaves import SparseDelta, is_structured
from peftjax.methods.sparse import scores, top_entries, with_values

# The modules of a block, by path below the block (`block`: a regex the block's own path
# matches in full); each module holds `kernel` (in, out) and maybe `bias`.
LAYOUTS = {
    'bert': {'block': r'(.+/)?layer_\d+', 'q': 'attention/query', 'k': 'attention/key',
             'v': 'attention/value', 'o': 'attention/output', 'up': 'intermediate',
             'down': 'output'},
    'llama': {'block': r'(.+/)?layers_\d+', 'q': 'self_attn/q_proj', 'k': 'self_attn/k_proj',
              'v': 'self_attn/v_proj', 'o': 'self_attn/o_proj', 'gate': 'mlp/gate_proj',
              'up': 'mlp/up_proj', 'down': 'mlp/down_proj'},
}
ATTENTION = ('q', 'k', 'v', 'o')
ROLES = ('v', 'o', 'u', 'd')  # selections: kv heads, query heads, up and down channels
_TRAINED = {'v': ('v', 1), 'o': ('o', 0), 'u': ('up', 1), 'd': ('down', 0)}  # module, axis


@dataclasses.dataclass(frozen=True)
class _Block:
  """A block's path ('' for the root) and sizes (0: the part is not permuted)."""
  path: str
  heads: int = 0
  kv_heads: int = 0
  head_dim: int = 0
  channels: int = 0


def _join(block: str, module: str, leaf: str = 'kernel') -> str:
  return P.SEP.join(p for p in (block, module, leaf) if p)


def _natural(path: str):
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', path)]


def _check_layout(layout: dict) -> dict:
  known = {'block', 'gate', 'up', 'down', *ATTENTION}
  if set(layout) - known or not all(isinstance(v, str) for v in layout.values()):
    raise ValueError(f's2ft layout: expected string values for keys among {sorted(known)}, '
                     f'got {layout!r}')
  attention = [r for r in ATTENTION if r in layout]
  if attention and len(attention) != len(ATTENTION):
    raise ValueError(f"s2ft layout: attention needs all of q, k, v, o; got {attention}")
  if (('up' in layout) != ('down' in layout)) or ('gate' in layout and 'up' not in layout):
    raise ValueError("s2ft layout: an FFN needs 'up' and 'down' (and optionally 'gate'); got "
                     f'{sorted(set(layout) - {"block", *ATTENTION})}')
  if not attention and 'up' not in layout:
    raise ValueError(f's2ft layout names neither attention nor an FFN: {layout!r}')
  return {'block': '', **layout}


def _block_paths(flat: dict, layout: dict) -> list[str]:
  """Paths of the blocks: those that match `layout['block']` and hold its o or down kernel."""
  anchors = [_join('', layout[r]) for r in ('o', 'down') if r in layout]
  found = set()
  for path in flat:
    for anchor in anchors:
      if path == anchor:
        prefix = ''
      elif path.endswith(P.SEP + anchor):
        prefix = path[:-len(anchor) - 1]
      else:
        continue
      if re.fullmatch(layout['block'], prefix):
        found.add(prefix)
  return sorted(found, key=_natural)


def _layout(flat: dict, layout) -> dict:
  if isinstance(layout, dict):
    return _check_layout(layout)
  if layout == 'auto':
    fits = [n for n, lay in LAYOUTS.items() if _block_paths(flat, lay)]
    if len(fits) != 1:
      raise ValueError(f"s2ft layout='auto' found {'several' if fits else 'no'} known "
                       f"block layouts in the params ({fits or list(LAYOUTS)}); name one, or "
                       'give the modules as a dict (see LAYOUTS)')
    return LAYOUTS[fits[0]]
  if layout not in LAYOUTS:
    raise ValueError(f"unknown s2ft layout {layout!r}; expected 'auto', one of "
                     f'{list(LAYOUTS)} or a dict of module paths')
  return LAYOUTS[layout]


def _blocks(flat: dict, layout: dict, num_heads, attention: bool, ffn: bool) -> list[_Block]:
  """Every block's sizes, checked; `attention` / `ffn`: whether those parts are permuted."""
  if attention and 'o' not in layout:
    raise ValueError('s2ft: v_ratio / o_ratio select attention heads, but the layout has no '
                     f'attention: {layout!r}')
  if ffn and 'down' not in layout:
    raise ValueError(f's2ft: u_ratio / d_ratio select FFN channels, but the layout has no '
                     f'FFN: {layout!r}')
  paths = _block_paths(flat, layout)
  if not paths:
    raise ValueError(f's2ft: no block of the layout {layout!r} in the params')
  if attention and not (isinstance(num_heads, int) and num_heads > 0):
    raise ValueError(f's2ft selects attention heads: num_heads must be a positive int (the '
                     f"model's query heads), got {num_heads!r}")
  out = []
  for path in paths:
    def shape(role, path=path):
      key = _join(path, layout[role])
      if key not in flat or len(flat[key].shape) != 2:
        raise ValueError(f's2ft: block {path!r} lacks the 2-D kernel {key} of {role!r}')
      return tuple(flat[key].shape)
    sizes = {}
    if attention:
      (_, width), (_, kv_width), v_shape, o_shape = (shape(r) for r in ATTENTION)
      if width % num_heads:
        raise ValueError(f's2ft: {path} has {width} query features, not divisible by '
                         f'num_heads={num_heads}')
      dim = width // num_heads
      if kv_width % dim or num_heads % (kv_width // dim) or v_shape[1] != kv_width:
        raise ValueError(f's2ft: {path}: key/value widths {kv_width}, {v_shape[1]} are not '
                         f'a divisor of the {num_heads} query heads of size {dim}')
      if o_shape[0] != width:
        raise ValueError(f's2ft: {path}: the output projection takes {o_shape[0]} features, '
                         f'the query projection gives {width}')
      sizes.update(heads=num_heads, kv_heads=kv_width // dim, head_dim=dim)
    if ffn:
      channels = shape('up')[1]
      if shape('down')[0] != channels or ('gate' in layout and shape('gate')[1] != channels):
        raise ValueError(f's2ft: {path}: the FFN kernels disagree on the channel count '
                         f"(up {channels}, down {shape('down')[0]})")
      sizes.update(channels=channels)
    out.append(_Block(path, **sizes))
  return out


def _draw(blocks: list[_Block], ratios: dict, seed: int) -> dict[str, dict[str, np.ndarray]]:
  """The official random selection (module docstring): `{block: {role: sorted ids}}`."""
  units = {'v': lambda b: b.kv_heads, 'o': lambda b: b.heads,
           'u': lambda b: b.channels, 'd': lambda b: b.channels}
  out = {b.path: {r: np.zeros(0, np.int64) for r in ROLES} for b in blocks}
  for role in ROLES:
    if not ratios[role]:
      continue
    sizes = {b.path: units[role](b) for b in blocks}
    k = int(sum(sizes.values()) * ratios[role])
    if k == 0:
      raise ValueError(f's2ft: {role}_ratio={ratios[role]} of {sum(sizes.values())} '
                       f"{'heads' if role in 'vo' else 'channels'} selects none")
    scored = {p: scores('random', np.zeros(n, np.float32), seed=seed, path=f'{p}#{role}')
              for p, n in sizes.items()}
    for path, ids in top_entries(scored, k).items():
      out[path][role] = ids
  return out


def _check_selection(blocks: list[_Block], selection: dict) -> dict:
  known = {b.path: b for b in blocks}
  out = {}
  for path, sel in selection.items():
    if path not in known:
      raise ValueError(f's2ft: the selection names block {path!r}, not a block of the '
                       f'params (blocks: {list(known)[:4]}...)')
    if set(sel) - set(ROLES):
      raise ValueError(f's2ft: selection keys must be among {ROLES}, got {sorted(sel)}')
    block = known[path]
    sizes = {'v': block.kv_heads, 'o': block.heads, 'u': block.channels, 'd': block.channels}
    out[path] = {}
    for role in ROLES:
      ids = np.asarray(sel.get(role, ()), np.int64).reshape(-1)
      if ids.size and (ids.min() < 0 or ids.max() >= sizes[role] or
                       np.unique(ids).size != ids.size):
        raise ValueError(f's2ft: {path} {role!r}: expected distinct ids in [0, {sizes[role]}), '
                         f'got {ids.tolist()}')
      out[path][role] = np.sort(ids)
  return out


def _order(n: int, first, second) -> np.ndarray:
  """0..n-1 as: `first` only, in both, `second` only, the rest; each ascending."""
  rank = np.full(n, 3)
  rank[second] = 2
  rank[first] = 0
  rank[np.intersect1d(first, second)] = 1
  return np.lexsort((np.arange(n), rank))


def _orders(block: _Block, sel: dict) -> dict[str, np.ndarray]:
  """The block's new orders: 'q' / 'kv' heads, 'ffn' channels (only the parts it permutes)."""
  out = {}
  if block.heads and (sel['v'].size or sel['o'].size):
    group = block.heads // block.kv_heads
    kv = _order(block.kv_heads, sel['v'], np.unique(sel['o'] // group))
    selected = np.zeros(block.heads, bool)
    selected[sel['o']] = True
    within = lambda j: sorted(range(j * group, (j + 1) * group), key=lambda h: not selected[h])
    out['kv'] = kv
    out['q'] = np.asarray([h for j in kv for h in within(j)], np.int64)
  if block.channels and (sel['u'].size or sel['d'].size):
    out['ffn'] = _order(block.channels, sel['u'], sel['d'])
  return out


def _expand(order: np.ndarray, size: int) -> np.ndarray:
  """A head order as feature indices (each head `size` consecutive features)."""
  return (order[:, None] * size + np.arange(size)).reshape(-1)


def _permutations(block: _Block, orders: dict) -> dict[str, tuple[np.ndarray, int]]:
  """`{role: (feature order, axis)}` of every kernel the block's orders move."""
  out = {}
  if 'q' in orders:
    q, kv = _expand(orders['q'], block.head_dim), _expand(orders['kv'], block.head_dim)
    out |= {'q': (q, 1), 'k': (kv, 1), 'v': (kv, 1), 'o': (q, 0)}
  if 'ffn' in orders:
    out |= {'gate': (orders['ffn'], 1), 'up': (orders['ffn'], 1), 'down': (orders['ffn'], 0)}
  return out


def _permute(flat: dict, layout: dict, blocks: list[_Block], orders: dict, inverse: bool):
  """`flat` with every coupled kernel (and the biases of the permuted outputs) reordered:
  host (numpy) leaves on the host, as a model's loaded params are (no device copy, no
  compiled gather per shape), device arrays on their devices."""
  flat = dict(flat)
  for block in blocks:
    for role, (order, axis) in _permutations(block, orders[block.path]).items():
      if role not in layout:  # no gate
        continue
      index = np.argsort(order) if inverse else order
      keys = [_join(block.path, layout[role])]
      if axis == 1:
        keys.append(_join(block.path, layout[role], 'bias'))
      for key in keys:
        if key not in flat:
          continue
        x = flat[key]
        if is_structured(x):
          raise TypeError(f's2ft permutes {key}, which holds a structured leaf ({x!r}); '
                          'S2FT must be the first method of a chain')
        xp = np if isinstance(x, np.ndarray) else jnp
        flat[key] = xp.take(x, index, axis=min(axis, x.ndim - 1))
  return flat


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything S2FT derives from a tree's paths and shapes."""
  layout: dict
  blocks: list
  selection: dict
  orders: dict
  targets: dict  # {kernel path: (sorted positions after the permutation, axis, feature order)}


def _plan(flat: dict, num_heads, ratios: dict, layout, seed: int, selection=None) -> _Plan:
  layout = _layout(flat, layout)
  if selection is None:
    blocks = _blocks(flat, layout, num_heads, bool(ratios['v'] or ratios['o']),
                     bool(ratios['u'] or ratios['d']))
    selection = _draw(blocks, ratios, seed)
  else:
    roles = {r for sel in selection.values() for r, ids in sel.items() if np.size(ids)}
    blocks = _blocks(flat, layout, num_heads, bool(roles & {'v', 'o'}),
                     bool(roles & {'u', 'd'}))
    selection = _check_selection(blocks, selection)
    blocks = [b for b in blocks if b.path in selection]
  orders = {b.path: _orders(b, selection[b.path]) for b in blocks}
  targets = {}
  for block in blocks:
    sel, perms = selection[block.path], _permutations(block, orders[block.path])
    for role in ROLES:
      if not sel[role].size:
        continue
      module, axis = _TRAINED[role]
      order = perms[module][0]
      ids = sel[role] if role in 'ud' else _expand(sel[role], block.head_dim)
      targets[_join(block.path, layout[module])] = (np.sort(np.argsort(order)[ids]), axis, order)
  return _Plan(layout, blocks, selection, orders, targets)


# ----------------------------------------------------------------------------- public API
def select(params, num_heads: int | None = None, *, v_ratio: float = 0.0,
           o_ratio: float = 0.052, u_ratio: float = 0.0, d_ratio: float = 0.02,
           layout='auto', seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """S2FT's random selection: `{block path: {'v': kv heads, 'o': query heads, 'u': up
  channels, 'd': down channels}}` (sorted ids in the base's order)."""
  ratios = _check_ratios(v_ratio, o_ratio, u_ratio, d_ratio)
  return _plan(P.flatten(params), num_heads, ratios, layout, seed).selection


def co_permute(params, selection: dict, num_heads: int | None = None, *, layout='auto',
               inverse: bool = False):
  """`params` with the weights coupled through the selected heads and channels co-permuted
  so that the selected parts lead (module docstring); the model's function is unchanged.
  `inverse=True` undoes it exactly. `selection` is `select`'s (or any such dict)."""
  flat = P.flatten(params)
  plan = _plan(flat, num_heads, {}, layout, 0, selection=selection)
  return P.unflatten(_permute(flat, plan.layout, plan.blocks, plan.orders, inverse))


def _check_ratios(v_ratio, o_ratio, u_ratio, d_ratio) -> dict:
  ratios = dict(zip(ROLES, (v_ratio, o_ratio, u_ratio, d_ratio)))
  for role, r in ratios.items():
    if not (isinstance(r, (int, float)) and 0.0 <= r <= 1.0):
      raise ValueError(f's2ft {role}_ratio must be in [0, 1], got {r!r}')
  if not any(ratios.values()):
    raise ValueError('s2ft trains nothing: every one of v_ratio, o_ratio, u_ratio, d_ratio is 0')
  return ratios


def s2ft(num_heads: int | None = None, *, v_ratio: float = 0.0, o_ratio: float = 0.052,
         u_ratio: float = 0.0, d_ratio: float = 0.02, layout='auto', seed: int = 0) -> Adapter:
  """S²FT on the blocks of `layout` ('auto': BERT or LLaMA by their param paths, or a dict
  like `LAYOUTS`'): trains the rows of W_o / W_down and the columns of W_v / W_up of randomly
  selected heads (`num_heads`: the model's query heads) and channels (module docstring).

  References:
    Yang et al., "S²FT: Efficient, Scalable and Generalizable LLM Fine-tuning by
    Structured Sparsity", NeurIPS 2024, arXiv:2412.06289.
  """
  ratios = _check_ratios(v_ratio, o_ratio, u_ratio, d_ratio)
  if num_heads is not None and not (isinstance(num_heads, int) and num_heads > 0):
    raise ValueError(f's2ft num_heads must be a positive int or None, got {num_heads!r}')
  if isinstance(layout, dict):
    _check_layout(layout)
  config = {'method': 's2ft', 'num_heads': num_heads, 'v_ratio': v_ratio, 'o_ratio': o_ratio,
            'u_ratio': u_ratio, 'd_ratio': d_ratio, 'layout': layout, 'seed': seed}
  plan = lambda flat: _plan(flat, num_heads, ratios, layout, seed)

  def init(rng, params, *, calib=None):
    del rng  # the selection follows `seed`, so that a file's config redraws it
    flat = P.flatten(params)
    p = plan(flat)
    flat = _permute(flat, p.layout, p.blocks, p.orders, inverse=False)
    state = {}
    for path, (index, axis, _) in p.targets.items():
      if isinstance(calib, Restored):
        saved = calib.frozen.get(f'{path}{P.SEP}index')
        if saved is None or not np.array_equal(saved, index):
          raise ValueError(f's2ft: the adapter file holds {"no" if saved is None else "other"} '
                           f'selected indices for {path} than seed {seed} draws for these '
                           'params')
      w = flat[path]
      shape = (index.size, w.shape[1]) if axis == 0 else (w.shape[0], index.size)
      values = jnp.zeros(shape, w.dtype)
      flat[path] = SparseDelta(w, jnp.asarray(index, jnp.int32), values, axis)
      state[path] = {'values': values}
    return P.unflatten(flat), state

  def apply(frozen, state):
    return with_values(frozen, state, 's2ft')

  def unmerge(merged, state):
    flat = P.flatten(merged)
    for path, (index, axis, _) in plan(flat).targets.items():
      w, values = flat[path], state[path]['values']
      delta = SparseDelta(jnp.zeros(w.shape, w.dtype), index, values, axis).delta()
      flat[path] = SparseDelta(w - delta.astype(w.dtype), jnp.asarray(index, jnp.int32),
                               jnp.zeros_like(values), axis)
    return P.unflatten(flat)

  def describe(frozen, state):
    flat = P.flatten(frozen)
    return {path: {'shape': list(flat[path].shape), 'trainable': int(st['values'].size),
                   ('rows', 'columns')[flat[path].axis]: int(flat[path].index.shape[0])}
            for path, st in state.items()}

  return Adapter(init=init, apply=apply, config=config, unmerge=unmerge, describe=describe)


def _adapter_plan(adapter: Adapter, tree, what: str) -> _Plan:
  config = dict(adapter.config)
  if config.pop('method', None) != 's2ft':
    raise ValueError(f"{what} takes an s2ft adapter, got {adapter.config.get('method')!r}")
  ratios = _check_ratios(*(config[f'{r}_ratio'] for r in ROLES))
  return _plan(P.flatten(tree), config['num_heads'], ratios, config['layout'], config['seed'])


def unpermute(adapter: Adapter, tree):
  """A plain tree in an `s2ft` adapter's permuted layout (e.g. its merged tree) in the base's
  own order: `unpermute(adapter, merge(adapter, frozen, state))` is the fused base."""
  p = _adapter_plan(adapter, tree, 'unpermute')
  return P.unflatten(_permute(P.flatten(tree), p.layout, p.blocks, p.orders, inverse=True))


def decouple(adapter: Adapter, frozen, state) -> dict[str, SparseDelta]:
  """The trained update of an `s2ft` adapter in the base's own (unpermuted) coordinates:
  `{kernel path: SparseDelta(None, rows or columns, values, axis)}`, so that
  `sparse.compose(base, d)` is `unpermute(adapter, merge(adapter, frozen, state))` and
  `sparse.compose(fused, sparse.negate(d))` takes it off again."""
  p = _adapter_plan(adapter, frozen, 'decouple')
  out = {}
  for path, st in state.items():
    index, axis, order = p.targets[path]
    original = order[index]  # the base's row / column at each trained position
    rank = np.argsort(original)
    out[path] = SparseDelta(None, jnp.asarray(original[rank], jnp.int32),
                            jnp.take(st['values'], rank, axis=axis), axis)
  return out
