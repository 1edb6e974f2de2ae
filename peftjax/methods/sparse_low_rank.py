"""SaRA: progressive sparse low-rank adaptation.

Hu, Zhang, Yi, Huang, Wang and Ma, "SaRA: High-Efficient Diffusion Model Fine-tuning with
Progressive Sparse Low-Rank Adaptation", ICLR 2025, arXiv:2409.06633; official code
sjtuplayer/SaRA (`optim/adamw.py`, the optimiser `examples/finetune.py` uses, and
`optim/adamw2.py`, its `--disable_ub` variant).

The weights of smallest magnitude, which the paper finds ineffective in pretrained models,
are trained: every entry of a target matrix W with |W| < `threshold` (one absolute threshold
for every matrix, entry by entry, as the official `param.abs() < threshold`), the mask M.
The model runs with

  W' = W ⊙ (1 - M) + P,   P zero outside M, P = W ⊙ M at init,

and training minimises the task loss plus the nuclear-norm low-rank term on the trained
sparse matrix, as the official `nuclear_norm(param * mask)` computes it (P = W' ⊙ M):

  lambda_rank * ||P_j||_*,   ||P||_* = sum_k sigma_k(P),

for one matrix j per step, drawn uniformly among the targets with min(shape) > `rank_min_dim`
(the official `random.choice(low_rank_ids)`: 2-D parameters with both dimensions over 64);
`rank_all=True` takes the mean over all of them instead, the expectation of that term, at
one SVD per matrix per step. Its gradient is U V^T of P's SVD on the selected entries.

Contract: the frozen tree holds each target as `SparseDelta(W ⊙ (1 - M), index of M,
values, None)` and the state `{path: {'values': P at M}}`: the selected weights themselves,
as the official optimiser holds them (so the trainer's AdamW weight decay acts on the
weights, as the official AdamW's does); the entries outside M are bit-identical to the base.
Only the values train and are saved; `load_adapter` restores the indices from the file.

Progressive parameter adjustment: partway through training (the official run: step 2500 of
5005) the selection is made again on the trained weights with the same threshold. Entries
that grew to |W| >= threshold stay at their trained values, frozen; those still below keep
training, with new optimiser moments (`optim/adamw.py` builds a new optimiser over them, while
the learning-rate scheduler goes on). `progressive=f` has the trainer do this after a fraction
f of the run's steps (`core.adapter.Reselection`; `configs/minilm_vader.py:sara` takes 0.5).
`adapter.reselection.reselect(frozen, state)` returns the new frozen tree and state, matrix
by matrix from the selected entries: every trained value kept (the merged model is
unchanged), the new mask M ∩ {|W'| < θ}. The trainer then starts the method's AdamW state
again (moments and bias-correction count; the schedule and the head's optimiser go on). As
the official `save_params`, adapter files hold the first selection's entries at their
trained values (`restate`); a run resumed after the re-selection selects again from the
adapter saved at that step (`WORKDIR/reselected`). Without `progressive`, a stage chain
whose second stage starts `'merged'` from the first (`peftjax.train.stages`) selects the
same entries, but also starts the task head, the learning-rate schedule and the data order
again.

Deviations from the official code:
- targets are the 2-D matrices `targets` matches; the official optimiser thresholds every
  parameter tensor of the model (biases, norms and convolutions too);
- the loss sees only the state, so the matrix of the step is drawn from the bits of the
  sum of the state's values (`draw`), which change at every step; the official step draws
  it with Python's `random`. `optim/adamw2.py` also skips matrices with at most 100
  selected entries; not reproduced. In `optim/adamw.py` the term's gradient lands on the
  model's original parameters, which that optimiser does not hold, so there it has no
  effect; here it trains, as in the paper and `optim/adamw2.py`;
- where P is rank-deficient the gradient keeps only the singular directions with
  sigma > max(shape) * eps * sigma_max (the minimum-norm subgradient; torch's SVD backward
  adds an arbitrary completion there, e.g. a nonzero gradient at P = 0);
- `optim/adamw.py` runs the first forward pass after the selection and after the
  re-selection with |W| in place of the selected weights (`trainable_params[i].abs()`) and
  skips the update of step T_p + 1; neither is reproduced;
- the learning rate is the trainer's `optimizer.lr`; the official optimiser, given none (as
  `finetune.py` gives none), uses `sara_lr(threshold)` = 1e-3 * exp(-350 * threshold);
- the threshold is absolute, as in the official code; `threshold_at(params, targets,
  fraction)` is the threshold under which a given fraction of the targets' entries lie.

Cost: the layers compute from the selected entries (`leaves.SparseDelta`); the low-rank term
forms the step's matrix densely and takes its SVD (every eligible matrix's with `rank_all`).
"""
from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.core import paths as P
from peftjax.core.adapter import Adapter, Reselection
from peftjax.core.calib import Restored
from peftjax.core.leaves import SparseDelta
from peftjax.methods.common import select_matrices, target_list
from peftjax.methods.sparse import (describe_values, entries_below, restored_indices,
                                     with_values)

THRESHOLD = 2e-3  # the official run script's
LAMBDA_RANK = 5e-4  # the official run script's
RANK_MIN_DIM = 64  # official: matrices with min(shape) > 64 get the low-rank term


def sara(targets, threshold: float = THRESHOLD, lambda_rank: float = LAMBDA_RANK, *,
         rank_min_dim: int = RANK_MIN_DIM, rank_all: bool = False,
         progressive: float = 0.0) -> Adapter:
  """Trains the entries of the 2-D params `targets` matches with |W| < `threshold`, with the
  nuclear-norm term `lambda_rank * ||P||_*` of one matrix drawn per step among those with
  min(shape) > `rank_min_dim`, or with `rank_all` the mean over all of them; `progressive`
  in (0, 1): the trainer selects again after that fraction of the run's steps (module
  docstring; 0: never).

  References:
    Hu et al., "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse
    Low-Rank Adaptation", ICLR 2025, arXiv:2409.06633.
  """
  targets = target_list(targets)
  if not (isinstance(threshold, numbers.Real) and threshold > 0):
    raise ValueError(f'sara threshold must be a positive number (an absolute |W|), got '
                     f'{threshold!r}')
  if not lambda_rank >= 0:
    raise ValueError(f'sara lambda_rank must be >= 0, got {lambda_rank!r}')
  if not (isinstance(rank_min_dim, int) and rank_min_dim >= 0):
    raise ValueError(f'sara rank_min_dim must be an int >= 0, got {rank_min_dim!r}')
  if not (isinstance(progressive, numbers.Real) and 0.0 <= progressive < 1.0):
    raise ValueError(f'sara progressive must be a fraction of the run in [0, 1) (0: no '
                     f're-selection), got {progressive!r}')
  config = {'method': 'sara', 'targets': targets, 'threshold': float(threshold),
            'lambda_rank': float(lambda_rank), 'rank_min_dim': rank_min_dim,
            'rank_all': bool(rank_all), 'progressive': float(progressive)}
  # Under the low-rank term, per matrix: the (shape, index) of the latest `init` that selected
  # that many entries (`loss` sees only the state; a re-selection selects fewer).
  ranked: dict[str, dict[int, tuple[tuple[int, int], jax.Array]]] = {}

  def init(rng, params, *, calib=None):
    del rng
    flat, chosen = select_matrices(params, targets)
    if isinstance(calib, Restored):
      index = restored_indices(calib, chosen)
    else:  # a matrix without entries under the threshold stays as it is
      index = {p: i for p in chosen if (i := entries_below(flat[p], threshold)).size}
      if not index:
        smallest = min(float(np.abs(np.asarray(flat[p], np.float32)).min()) for p in chosen)
        raise ValueError(f'sara: no entry of the targets has |W| < threshold {threshold:g} '
                         f'(the smallest |W| is {smallest:g})')
    state = {}
    for path in index:  # on the host, as the selection: no per-shape compiles
      flat[path], state[path] = selected(path, np.array(flat[path]), index[path])
    return P.unflatten(flat), state

  def selected(path, w: np.ndarray, index: np.ndarray):
    """The leaf of the matrix `w` (overwritten) training the entries at the flat `index`,
    and their state; registered for the low-rank term."""
    values = jnp.asarray(w.reshape(-1)[index])
    w.reshape(-1)[index] = 0
    idx = jnp.asarray(index, jnp.int32)
    if min(w.shape) > rank_min_dim:
      ranked.setdefault(path, {})[idx.size] = (tuple(w.shape), idx)
    return SparseDelta(jnp.asarray(w), idx, jnp.zeros_like(values), None), {'values': values}

  def reselect(frozen, state):
    """The progressive adjustment (module docstring): the entries of the selection whose
    trained |W| is still below the threshold train on, the others stay at their trained
    values in the frozen tree (the merged model is unchanged)."""
    flat, again = P.flatten(frozen), {}
    for path, st in state.items():
      leaf, values = flat[path], np.asarray(st['values'])
      index, w = np.asarray(leaf.index), np.array(leaf.w)
      w.reshape(-1)[index] = values  # the trained matrix
      below = index[np.abs(values) < threshold]
      flat[path] = jnp.asarray(w)
      if below.size:
        flat[path], again[path] = selected(path, w, below)
    return P.unflatten(flat), again

  def apply(frozen, state):
    return with_values(frozen, state, 'sara')

  def loss(state):
    if not ranked:
      return jnp.zeros((), jnp.float32)
    values, norms = {}, []
    for path, selections in ranked.items():
      values[path] = state.get(path, {}).get('values')
      count = None if values[path] is None else values[path].shape[0]
      if count not in selections:
        raise ValueError(f'sara: the low-rank term expects {" or ".join(map(str, selections))} '
                         f'values for {path} (the selections of init), the state has {count}')
      norms.append(functools.partial(_masked_nuclear_norm, path, *selections[count]))
    if rank_all or len(norms) == 1:
      return lambda_rank * sum(norm(values) for norm in norms) / len(norms)
    return lambda_rank * jax.lax.switch(draw(values, len(norms)), norms, values)

  return Adapter(init=init, apply=apply, config=config, loss=loss if lambda_rank else None,
                 describe=describe_values,
                 reselection=Reselection(progressive, reselect, restate) if progressive else None)


def _masked_nuclear_norm(path, shape, index, values):
  return nuclear_norm(sparse_matrix(values[path], index, shape))


def draw(values: dict, n: int) -> jax.Array:
  """An index in [0, n) drawn from the bits of the sum of `values` (the loss sees only the
  state, which changes at every step): the golden-ratio hash's top 16 bits, modulo n."""
  total = sum(jnp.sum(v.astype(jnp.float32)) for v in values.values())
  bits = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(total), jnp.uint32)
  return ((bits * jnp.uint32(0x9E3779B1)) >> 16).astype(jnp.int32) % n


def sparse_matrix(values, index, shape) -> jax.Array:
  """The float32 matrix of `shape` holding `values` at the flat `index`, zero elsewhere."""
  size = math.prod(shape)
  return jnp.zeros(size, jnp.float32).at[index].set(values.astype(jnp.float32)).reshape(shape)


@jax.custom_vjp
def nuclear_norm(x: jax.Array) -> jax.Array:
  """The sum of the singular values of the matrix `x`; its gradient is U V^T over the
  singular values above max(shape) * eps * sigma_max (the minimum-norm subgradient)."""
  return jnp.sum(jnp.linalg.svd(x, compute_uv=False))


def _nuclear_norm_fwd(x):
  u, s, vt = jnp.linalg.svd(x, full_matrices=False)
  return jnp.sum(s), (u, s, vt)


def _nuclear_norm_bwd(residuals, g):
  u, s, vt = residuals
  tol = s[0] * max(u.shape[0], vt.shape[1]) * jnp.finfo(s.dtype).eps
  return (g * (u * (s > tol).astype(u.dtype)) @ vt,)


nuclear_norm.defvjp(_nuclear_norm_fwd, _nuclear_norm_bwd)


def restate(frozen, frozen_now, state_now) -> dict:
  """The state of `init`'s selection (`frozen`) whose model is that of the re-selected
  `(frozen_now, state_now)`: every entry of the first selection at its trained value."""
  now, out = P.flatten(frozen_now), {}
  for path, leaf in P.flatten(frozen).items():
    if isinstance(leaf, SparseDelta):
      index, current = np.asarray(leaf.index), now[path]
      trained = np.asarray(getattr(current, 'w', current)).reshape(-1)[index]
      if isinstance(current, SparseDelta):  # where it trains on: the state's values
        trained[np.searchsorted(index, np.asarray(current.index))] = state_now[path]['values']
      out[path] = {'values': jnp.asarray(trained)}
  return out


def sara_lr(threshold: float = THRESHOLD) -> float:
  """The official optimiser's learning rate when given none: 1e-3 * exp(-350 * threshold)."""
  return 1e-3 * math.exp(-350.0 * threshold)


def threshold_at(params, targets, fraction: float) -> float:
  """The absolute threshold under which `fraction` of the entries of the 2-D params
  `targets` matches lie (exactly round(fraction * entries) of them where the |W| differ)."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'fraction must be in (0, 1], got {fraction}')
  flat, chosen = select_matrices(params, target_list(targets))
  magnitudes = np.concatenate([np.abs(np.asarray(flat[p], np.float32)).ravel() for p in chosen])
  k = round(fraction * magnitudes.size)
  if k >= magnitudes.size:
    return float(np.nextafter(magnitudes.max(), np.float32(np.inf)))
  return float(np.partition(magnitudes, k)[k])
