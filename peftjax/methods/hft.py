"""Half fine-tuning: in every transformer block, half of each category's matrices train.

HFT (Hui, Zhang, Wang, Xu, Sun & Wu, "HFT: Half Fine-Tuning for Large Language Models",
arXiv:2404.18466, ACL 2025). The parameters split into an updated half and a frozen half,
theta = {vartheta, psi}, and a step moves only the first:

  vartheta_t = vartheta_{t-1} - eta * grad_vartheta L(theta_{t-1}),   psi_t = psi_{t-1},

which the paper reads as full fine-tuning under the penalty
lambda * ||(I - M)(theta - theta_0)||^2 on the frozen part (mask I - M), maximised over
lambda. The selection is category-level: in each block, two of LLaMA's four self-attention
matrices (W_Q, W_K, W_V, W_O) train; of its three feed-forward matrices (W_up, W_down,
W_gate) two train in one half of the blocks and one in the other half; one of the block's two
norms trains. Embeddings and the LM head (everything outside the blocks) train, as in the
paper (`train_rest=False` freezes them instead). The selection is random and redone at the
start of every fine-tuning stage (SFT, then DPO; each task of a continual-learning sequence),
so a new half learns each stage while the other keeps what it held.

Here a "matrix" is a parameter's module (a kernel with its bias, a norm's scale with its
bias), a block is the path prefix up to the end of the regex `blocks`' match
(`encoder/layer_3/`, `layers_3/`), and a param's category is the first regex of `categories`
found in the rest of its path. The defaults cover the bundled BERT (`attention/{query,key,
value,output}`, `intermediate`, `output`, `attention_norm`, `output_norm`), LLaMA
(`self_attn/*`, `mlp/*`, `input_layernorm`, `post_attention_layernorm`) and T5 param paths.
A category of n matrices in a block trains n/2 of them; if n is odd, floor(n/2) in a random
floor(B/2) of the B blocks where it is odd and ceil(n/2) in the others: the paper's
feed-forward rule, applied to any odd category. Which matrices is drawn from `seed`, the
category and the block alone, so the same `seed` gives the same selection on the same model
(`load_adapter` re-runs `init`); the `rng` of `init` is not used.

No official code is public; the rules above are the paper's. Beyond it: biases go with their
matrices (LLaMA has none); T5's decoder cross-attention is a category of its own and its three
norms an odd category; with B odd, an odd category trains one matrix more than half (the
paper's models have even B); the draws are numpy's, keyed by names, not the paper's.

The state holds the selected parameters themselves, `{path: array}` like `full`'s, and the
frozen tree the rest: the optimiser's moments, the gradients and the adapter file cover the
trainable half only, and the backward pass forms no weight gradient for a frozen matrix.

Stages: run each stage with `peftjax.train.stages` (`start='merged'`, so that it starts from
the previous stage's merged result) and give each its own `method.seed`, which draws its half
(`configs/minilm_vader_hft.py` uses the stage's index); stages that share a seed train the
same half, which is not HFT's schedule. To re-select every epoch instead, run each epoch as a
stage.
"""
from __future__ import annotations

import re
import zlib

import numpy as np

from peftjax.core import paths as P
from peftjax.core.adapter import Adapter, combine

BLOCKS = r'(?:^|/)layers?_\d+/'
CATEGORIES = {
    'attention': r'^(?:attention|self_attn)/',
    'cross_attention': r'^cross_attention/',
    'ffn': r'^(?:mlp|intermediate|output)/',
    'norm': r'^\w*norm/',
}


def _compile(pattern: str, what: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f'hft: {what} {pattern!r} is not a valid regex: {e}') from None


def _rng(seed: int, *names: str) -> np.random.Generator:
  return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


def groups(paths, blocks: str = BLOCKS, categories=None) -> tuple[dict, list[str]]:
  """`({category: {block: {module: [its param paths]}}}, paths outside every block)`; a
  module is a param's parent path (a kernel and its bias). Raises if `blocks` matches no
  path, or if a path inside a block matches no category."""
  categories = dict(CATEGORIES if categories is None else categories)
  block_re = _compile(blocks, 'blocks')
  cat_res = {c: _compile(r, f'category {c!r}') for c, r in categories.items()}
  paths = list(paths)
  found: dict[str, dict[str, dict[str, list[str]]]] = {}
  rest = []
  for path in paths:
    m = block_re.search(path)
    if m is None:
      rest.append(path)
      continue
    block, inner = path[:m.end()].rstrip(P.SEP), path[m.end():]
    category = next((c for c, r in cat_res.items() if r.search(inner)), None)
    if category is None:
      raise ValueError(f'hft: {path} is in block {block} but matches no category of '
                       f'{categories} (searched in {inner!r}); add a category for it')
    module = path.rsplit(P.SEP, 1)[0] if P.SEP in inner else path
    found.setdefault(category, {}).setdefault(block, {}).setdefault(module, []).append(path)
  if not found:
    raise P.PatternError('hft: blocks ' + P.no_match_message(blocks, paths, 'parameter'))
  return found, rest


def select_half(grouped: dict, seed: int) -> dict[str, dict[str, list[str]]]:
  """`{category: {block: the trainable modules}}` of `grouped` (`groups`' first output):
  half of each category's modules in each block, odd counts balanced over the blocks
  (module docstring)."""
  out = {}
  for category, per_block in grouped.items():
    odd = sorted(b for b, mods in per_block.items() if len(mods) % 2)
    order = _rng(seed, category).permutation(len(odd))
    fewer = {odd[i] for i in order[:len(odd) // 2]}  # these train floor(n/2), the rest ceil
    out[category] = {}
    for block, mods in per_block.items():
      mods = sorted(mods)
      k = len(mods) // 2 if block in fewer else -(-len(mods) // 2)
      picked = _rng(seed, category, block).choice(len(mods), k, replace=False)
      out[category][block] = [mods[i] for i in sorted(picked)]
  return out


def hft(blocks: str = BLOCKS, seed: int = 0, *, categories: dict | None = None,
        train_rest: bool = True) -> Adapter:
  """Half fine-tuning (module docstring): per block (`blocks`, a regex) and per category
  (`categories`, `{name: regex}` on the path after the block), half of the matrices train,
  drawn by `seed`; parameters outside every block train if `train_rest`.

  References:
    Hui et al., "HFT: Half Fine-Tuning for Large Language Models", ACL 2025,
    arXiv:2404.18466.
  """
  if not isinstance(seed, int) or isinstance(seed, bool):
    raise ValueError(f'hft seed must be an int, got {seed!r}')
  if not isinstance(blocks, str):
    raise ValueError(f'hft blocks must be one regex string, got {blocks!r}')
  categories = dict(CATEGORIES if categories is None else categories)
  if not categories or not all(isinstance(r, str) for r in categories.values()):
    raise ValueError(f'hft categories must be a non-empty {{name: regex}} dict, got '
                     f'{categories!r}')
  _compile(blocks, 'blocks')
  for name, regex in categories.items():
    _compile(regex, f'category {name!r}')
  config = {'method': 'hft', 'blocks': blocks, 'seed': seed, 'categories': categories,
            'train_rest': bool(train_rest)}

  def trainable_paths(flat) -> set[str]:
    grouped, rest = groups(flat, blocks, categories)
    chosen = select_half(grouped, seed)
    keep = set(rest) if train_rest else set()
    for category, per_block in chosen.items():
      for block, mods in per_block.items():
        keep.update(p for m in mods for p in grouped[category][block][m])
    return keep

  def init(rng, params, *, calib=None):
    del rng, calib  # the selection is the seed's alone (module docstring)
    flat = P.flatten(params)
    keep = trainable_paths(flat)
    state = {p: v for p, v in flat.items() if p in keep}
    return P.unflatten({p: v for p, v in flat.items() if p not in keep}), state

  def apply(frozen, state):
    return combine(state, frozen)

  def unmerge(merged, state):
    return P.unflatten({p: v for p, v in P.flatten(merged).items() if p not in state})

  return Adapter(init=init, apply=apply, config=config, unmerge=unmerge)
