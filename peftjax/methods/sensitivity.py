"""SPT: "Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning" (He, Cai, Zhang, Tao and
Zhuang, ICCV 2023, arXiv:2303.08566; official code ziplab/SPT, `engine.get_sensitivity`).

Sensitivity: each entry w_n of the target matrices is scored by the loss reduction that
tuning it alone would bring, estimated to first order from its gradient; the official code
(`engine.get_sensitivity`) accumulates it over the calibration mini-batches c as
s_n = sum_c (g_n^(c))^2, g^(c) the loss gradient on batch c. Here it is
`Calibration.squared_gradient`, the mean over the batches (the same ranking).

Allocation: the top-tau entries S by s_n over all targets together; a matrix W (in, out)
whose count |S ∩ W| reaches the threshold, |S ∩ W| >= threshold * (in + out) * r, is tuned
with LoRA of rank r instead (its (in + out) * r factor entries train; its entries of S are
dropped); every other matrix trains its entries of S unstructured (a `SparseDelta` with zero
values, as `sparse_ft`). The trainable total (LoRA factors plus sparse entries) is what the
budget counts. LoRA is the official `StructuredTuningModule`: W + A @ B with A (in, r) drawn
from U(-1/sqrt(in), 1/sqrt(in)) (torch's kaiming_uniform(a=sqrt(5)) of Linear(in, r)), B = 0,
no scale, and dropout on its input (the official `structured_drop`, 0.1).

Restoring: the state per target is `{'values'}` (sparse) or `{'a', 'b'}` (LoRA); adapter files
save the sparse indices under `frozen/`, so `init` with `calib.Restored` rebuilds each
target's kind from the file (a saved index: sparse; a saved `a`: LoRA; neither: untouched)
without calibration data.

Deviations from the official code:
- Budget: the official code sweeps tau over 0.02M, 0.04M, ..., 1.58M entries and keeps the
  configuration whose total is nearest the budget, above or below. Here tau grows one entry
  at a time up to the largest tau whose total fits the budget; the rest of the budget goes to
  the next most sensitive entries that fit (an entry whose matrix would then switch to LoRA
  at a cost beyond what is left is skipped, and that matrix takes no further entries), so
  the total equals the budget exactly (an error says so where no allocation reaches it).
- `threshold` is the official 1 / alpha (alpha = 10 in the released configs: 0.1 here).
- Only 2-D targets: the official code also ranks biases and norms and tunes a vector fully
  when 1 / beta of it is sensitive (`--structured_vector`); chain `full` after SPT for those.
  The task head trains as for every method and is not counted in the budget (the official
  total adds a constant 768). A matrix left with no sensitive entry is not adapted.
- LoRA only (the official `structured_type='adapter'` is not offered); the official 0.1
  drop-path on the LoRA output is not reproduced.
- Sensitivities come from the model in inference mode (`Calibration`: no dropout), on the
  trainer's `config.calibration.batches` training batches (official: training mode, 16).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from peftjax.core import calib as C
from peftjax.core import paths as P
from peftjax.core.adapter import Adapter, is_entry
from peftjax.core.leaves import LowRank, SparseDelta, is_structured
from peftjax.methods.common import (check_dropout, check_rank, linear_init, select_matrices,
                                    target_list)
from peftjax.methods.sparse import ranked, restored_indices, split_positions


# ----------------------------------------------------------------------------- allocation
def sensitivities(calib: C.Calibration, paths) -> dict[str, np.ndarray]:
  """`{path: s}`, s = the per-batch squared loss gradient averaged over `calib`'s batches."""
  return {p: np.asarray(jax.device_get(s), np.float32)
          for p, s in calib.iter_squared_gradients(list(paths))}


def lora_size(shape, rank: int) -> int:
  """The trainable entries of rank-`rank` LoRA on a matrix of `shape`: (in + out) * r."""
  return (int(shape[0]) + int(shape[1])) * rank


def switch_count(shape, rank: int, threshold: float) -> int:
  """The count of sensitive entries at which a matrix of `shape` switches to LoRA: the
  smallest integer >= threshold * (in + out) * r (float rounding forgiven)."""
  return max(1, math.ceil(threshold * lora_size(shape, rank) * (1 - 1e-12)))


class Allocation(NamedTuple):
  """SPT's choice: the paths tuned with LoRA and `{path: sorted flat indices}` of the rest."""
  lora: list[str]
  entries: dict[str, np.ndarray]


def allocate(scored: dict[str, np.ndarray], budget: int, rank: int,
             threshold: float) -> Allocation:
  """Spends exactly `budget` trainable entries over the matrices of `scored` (their
  sensitivities) by SPT's rule (module docstring).

  Walking the entries by descending score (ties: the earlier path and position first), an
  entry of a matrix already on LoRA is free; the entry that brings its matrix's count to
  `switch_count` switches it to LoRA at the cost of its factors less the entries it held,
  if that fits (else the matrix takes no further entries); any other entry costs one.
  """
  paths = list(scored)
  if not paths:
    raise ValueError('SPT: no target matrices to allocate over')
  sizes = np.array([scored[p].size for p in paths], np.int64)
  cost = np.array([lora_size(scored[p].shape, rank) for p in paths], np.int64)
  switch = np.array([switch_count(scored[p].shape, rank, threshold) for p in paths], np.int64)
  flat = np.concatenate([np.asarray(scored[p], np.float32).reshape(-1) for p in paths])
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  if not 0 < budget:
    raise ValueError(f'SPT budget must be positive, got {budget}')
  k = min(flat.size, 2 * budget)
  while True:  # the top k candidates in order; more only if the walk runs out of them
    order = ranked(flat, k)
    owner = np.searchsorted(starts, order, side='right') - 1
    lora, taken, left = _walk(owner, budget, cost, switch)
    if not left or k == flat.size:
      break
    k = min(flat.size, 4 * k)
  if left:
    raise ValueError(
        f'SPT cannot spend a budget of {budget} trainable entries exactly over these targets '
        f'with rank {rank} and threshold {threshold}: the allocation stops at '
        f'{budget - left} (LoRA factors {int(sum(cost[m] for m in lora))}); lower the budget '
        f'or change rank / threshold')
  entries = split_positions(order[taken], dict(zip(paths, sizes.tolist())))
  return Allocation([paths[m] for m in sorted(lora)],
                    {p: e for p, e in entries.items() if e.size})


def _walk(owner: np.ndarray, budget: int, cost: np.ndarray, switch: np.ndarray):
  """The allocation over candidates in score order, owned by matrices `owner`: (matrices
  on LoRA, positions of the sparse entries taken, budget left)."""
  n = owner.size
  by_owner = np.argsort(owner, kind='stable')
  grouped = owner[by_owner]
  rank_in = np.empty(n, np.int64)  # how many of its matrix's entries precede each candidate
  rank_in[by_owner] = np.arange(n) - np.searchsorted(grouped, grouped, side='left')
  plain = np.flatnonzero(rank_in < switch[owner] - 1)  # cost one each
  triggers = np.flatnonzero(rank_in == switch[owner] - 1)  # would switch their matrix
  left, accepted, lora = int(budget), 0, set()
  for t in triggers:
    before = int(np.searchsorted(plain, t)) - accepted
    if before >= left:
      accepted, left = accepted + left, 0
      break
    accepted, left = accepted + before, left - before
    m = int(owner[t])
    price = int(cost[m] - (switch[m] - 1))  # its switch_count - 1 entries were all taken
    if price <= left:
      lora.add(m)
      left -= price
      if not left:
        break
  else:
    more = min(left, plain.size - accepted)
    accepted, left = accepted + more, left - more
  taken = plain[:accepted]
  return lora, taken[~np.isin(owner[taken], list(lora))], left


# ----------------------------------------------------------------------------- the method
def spt(targets, budget: int | float = 0.005, threshold: float = 0.1, rank: int = 8, *,
        dropout: float = 0.1) -> Adapter:
  """SPT on the 2-D params `targets` match (module docstring); needs `calib` in `init`.

  Args:
    targets: regexes searched in slash paths.
    budget: trainable entries in all (LoRA factors plus sparse entries): an int is a count,
      a float in (0, 1) a fraction of the targeted entries (rounded, at least 1).
    threshold: a matrix switches to LoRA when its count of sensitive entries reaches
      threshold * (in + out) * rank, in (0, 1] (the official 1 / alpha).
    rank: the LoRA rank r of every switched matrix (the official `low_rank_dim`).
    dropout: dropout on the input of the LoRA path (training only).

  References:
    He et al., "Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning" (SPT), ICCV 2023,
    arXiv:2303.08566.
  """
  targets = target_list(targets)
  if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
    budget = int(budget)
  elif isinstance(budget, numbers.Real) and not isinstance(budget, bool):
    budget = float(budget)
  if isinstance(budget, bool) or not isinstance(budget, (int, float)):
    raise ValueError(f'SPT budget must be an int (entries) or a float in (0, 1) (a fraction '
                     f'of the targeted entries), got {budget!r}')
  if isinstance(budget, int) and budget < 1:
    raise ValueError(f'SPT budget must be at least 1 entry, got {budget}')
  if isinstance(budget, float) and not 0.0 < budget < 1.0:
    raise ValueError(f'SPT budget as a fraction must be in (0, 1), got {budget}')
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f'SPT threshold must be in (0, 1] (a fraction of the LoRA entries), got '
                     f'{threshold}')
  check_rank('SPT', None, rank)
  check_dropout('SPT', dropout)
  config = {'method': 'spt', 'targets': targets, 'budget': budget, 'threshold': threshold,
            'rank': rank, 'dropout': dropout}

  def init(rng, params, *, calib=None):
    flat, chosen = select_matrices(params, targets)
    for path in chosen:
      if is_structured(flat[path]):
        raise ValueError(f'SPT adapts plain weights; {path} holds {flat[path]!r}')
      check_rank('SPT', path, rank, flat[path].shape)
    if isinstance(calib, C.Restored):
      lora = {p for p in chosen if calib.state_leaf(p, 'a') is not None}
      entries = restored_indices(calib, chosen)
    else:
      total = sum(int(np.prod(flat[p].shape)) for p in chosen)
      count = budget if isinstance(budget, int) else max(1, round(budget * total))
      scored = sensitivities(C.live('spt', calib), chosen)
      lora, entries = allocate(scored, count, rank, threshold)
    state = {}
    for key, path in zip(jax.random.split(rng, len(chosen)), chosen):
      w = flat[path]
      if path in lora:
        state[path] = {'a': linear_init(key, (w.shape[0], rank), w.shape[0], w.dtype),
                       'b': jnp.zeros((rank, w.shape[1]), w.dtype)}
      elif path in entries:
        k = len(entries[path])
        flat[path] = SparseDelta(w, jnp.asarray(entries[path], jnp.int32),
                                 jnp.zeros((k,), w.dtype))
        # Its own buffer: the trainer donates the state's, which the frozen tree outlives.
        state[path] = {'values': jnp.zeros((k,), w.dtype)}
    return P.unflatten(flat), state

  def apply(frozen, state):
    flat = P.flatten(frozen)
    for path, st in state.items():
      leaf = flat[path]
      if is_entry(st, ('values',)):
        if not isinstance(leaf, SparseDelta) or leaf.values.shape != st['values'].shape:
          raise ValueError(f'SPT: {path} holds {leaf!r} in the frozen tree, but the state has '
                           f'sparse values of shape {tuple(st["values"].shape)}')
        flat[path] = SparseDelta(leaf.w, leaf.index, st['values'], leaf.axis)
      elif is_entry(st, ('a', 'b')):
        if is_structured(leaf):
          raise ValueError(f'SPT: {path} holds {leaf!r} in the frozen tree, but the state has '
                           f'LoRA factors')
        chex.assert_shape(st['a'], (leaf.shape[0], rank), custom_message=f'SPT A of {path}')
        chex.assert_shape(st['b'], (rank, leaf.shape[1]), custom_message=f'SPT B of {path}')
        flat[path] = LowRank(leaf, st['a'], st['b'], 1.0, dropout)
      else:
        raise ValueError(f"SPT: the state of {path} must hold 'values' or 'a' and 'b', got "
                         f'{sorted(st)}')
    return P.unflatten(flat)

  def describe(frozen, state):
    flat, out = P.flatten(frozen), {}
    for path, st in state.items():
      shape = list(flat[path].shape)
      if 'values' in st:
        out[path] = {'shape': shape, 'trainable': int(st['values'].size), 'tuning': 'entries',
                     'rank': 0, 'density': float(st['values'].size / np.prod(shape))}
      else:
        size = int(st['a'].size + st['b'].size)
        out[path] = {'shape': shape, 'trainable': size, 'tuning': 'lora',
                     'rank': int(st['a'].shape[1]), 'density': float(size / np.prod(shape))}
    return out

  return Adapter(init=init, apply=apply, config=config, describe=describe)
