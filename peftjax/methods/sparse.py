"""Sparse fine-tuning: only a selected few entries (or rows, or columns) of the weights train.

`sparse_ft` selects entries of the target matrices by a score and trains only their values:
the frozen tree holds each target as a `SparseDelta` (the base weight, the sorted indices and
zero values) and the state holds the values alone, `{path: {'values': ...}}`, so the
optimiser's moments and the adapter file are proportional to the selection.

Scores (`select`): 'magnitude' (largest |W|), 'smallest' (smallest |W|), 'random', and
'change' (largest |W_ref - W| against a `reference` tree, e.g. a full fine-tuning run: the
second phase of LT-SFT). Entries are chosen across all targets at once (`per_matrix=False`,
as LT-SFT does) or `density` of each matrix; rows / columns (`structure`) by the L2 norm of
their scores, per matrix.

Composable sparse fine-tuning, LT-SFT (Ansell et al., ACL 2022, arXiv:2110.07560; official
code cambridgeltl/composable-sft): phase 1 fine-tunes every parameter; the k entries that
changed most (one global threshold) are selected, the model is reset to its pretrained
values and phase 2 trains only those entries, with the L1 pull towards the pretrained values
(`l1`: l1 * sum |values| / targeted entries). Run it as two stages, the second with
`start='reference'` (`peftjax.train.stages`), which passes phase 1's merged result as
`reference`. Sparse differences compose by addition: `compose(params, d_task, d_domain)`.
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.core import paths as P
from peftjax.core.adapter import Adapter
from peftjax.core.calib import Restored
from peftjax.core.leaves import SparseDelta
from peftjax.methods.common import select_matrices, target_list

SELECTIONS = ('magnitude', 'smallest', 'random', 'change')
STRUCTURES = {'entries': None, 'rows': 0, 'columns': 1}


# ----------------------------------------------------------------------------- selection
def scores(select: str, w, *, reference=None, seed: int = 0, path: str = '') -> np.ndarray:
  """Per-entry scores of the weight `w` (higher is chosen first), as float32 numpy."""
  w = np.asarray(w, np.float32)
  if select == 'magnitude':
    return np.abs(w)
  if select == 'smallest':
    return -np.abs(w)
  if select == 'random':
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    return rng.random(w.shape, np.float32)
  if select == 'change':
    if reference is None:
      raise ValueError(f"select='change' needs a reference weight for {path}")
    return np.abs(np.asarray(reference, np.float32) - w)
  raise ValueError(f'unknown select {select!r}; expected one of {SELECTIONS}')


def ranked(flat: np.ndarray, k: int) -> np.ndarray:
  """The positions of the `k` largest entries of the 1-D `flat`, largest first (ties: the
  earlier position first), without sorting all of it."""
  flat = np.asarray(flat)
  if not 0 < k <= flat.size:
    raise ValueError(f'cannot select {k} entries out of {flat.size}')
  if not np.isfinite(flat).all():
    raise ValueError('the selection scores hold NaN or infinite values')
  if k < flat.size:
    kth = np.partition(flat, flat.size - k)[flat.size - k]
    above = np.flatnonzero(flat > kth)
    candidates = np.concatenate([above, np.flatnonzero(flat == kth)[:k - above.size]])
  else:
    candidates = np.arange(flat.size)
  return candidates[np.lexsort((candidates, -flat[candidates]))]


def split_positions(positions: np.ndarray, sizes: dict[str, int]) -> dict[str, np.ndarray]:
  """Positions in the concatenation of flattened matrices of `sizes` as `{path: sorted flat
  indices}` within each matrix."""
  positions, out, start = np.sort(positions), {}, 0
  for path, size in sizes.items():
    out[path] = (positions[(positions >= start) & (positions < start + size)] - start
                 ).astype(np.int64)
    start += size
  return out


def top_entries(scored: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
  """The `k` highest-scoring entries over all of `scored` together: `{path: sorted flat
  indices}` (ties at the threshold go to the earlier path and position)."""
  total = sum(s.size for s in scored.values())
  if not 0 < k <= total:
    raise ValueError(f'cannot select {k} entries out of {total}')
  flat = np.concatenate([s.reshape(-1) for s in scored.values()])
  return split_positions(ranked(flat, k), {p: s.size for p, s in scored.items()})


def top_lines(score: np.ndarray, k: int, axis: int) -> np.ndarray:
  """The `k` rows (axis 0) or columns (axis 1) of largest score norm, sorted."""
  norms = np.linalg.norm(score, axis=1 - axis)
  if not 0 < k <= norms.size:
    raise ValueError(f'cannot select {k} of {norms.size} {("rows", "columns")[axis]}')
  return np.sort(np.argsort(-norms, kind='stable')[:k])


def entries_below(w, threshold: float) -> np.ndarray:
  """The sorted flat indices of the entries of `w` with |w| < `threshold` (compared in
  float32)."""
  return np.flatnonzero(np.abs(np.asarray(w, np.float32)) < np.float32(threshold))


def index_dtype(largest: int):
  """The smallest unsigned integer type that holds `largest`."""
  for dtype in (np.uint8, np.uint16, np.uint32):
    if largest <= np.iinfo(dtype).max:
      return dtype
  return np.uint64


# ----------------------------------------------------------------------------- the method
def sparse_ft(targets, density: float = 0.005, select: str = 'magnitude', *,
              structure: str = 'entries', per_matrix: bool = False, reference: str = '',
              l1: float = 0.0, seed: int = 0) -> Adapter:
  """Trains `density` of the entries (or rows / columns) of the 2-D params `targets` match,
  chosen by `select` (module docstring); `reference` is a params file (`model.safetensors`,
  `peftjax.io.params_file`) for `select='change'`.

  References:
    Ansell et al., "Composable Sparse Fine-Tuning for Cross-Lingual Transfer" (LT-SFT),
    ACL 2022, arXiv:2110.07560.
  """
  targets = target_list(targets)
  if structure not in STRUCTURES:
    raise ValueError(f'unknown structure {structure!r}; expected one of {list(STRUCTURES)}')
  if select not in SELECTIONS:
    raise ValueError(f'unknown select {select!r}; expected one of {SELECTIONS}')
  if not 0.0 < density <= 1.0:
    raise ValueError(f'density must be in (0, 1], got {density}')
  if (select == 'change') != bool(reference):
    raise ValueError("select='change' and a reference params file go together; got "
                     f'select={select!r}, reference={reference!r}')
  axis = STRUCTURES[structure]
  config = {'method': 'sparse_ft', 'targets': targets, 'density': density, 'select': select,
            'structure': structure, 'per_matrix': per_matrix, 'reference': reference,
            'l1': l1, 'seed': seed}
  counted = {}  # the number of targeted entries, for the L1 term's normalisation

  def init(rng, params, *, calib=None):
    del rng
    flat, chosen = select_matrices(params, targets)
    if isinstance(calib, Restored):
      index = restored_indices(calib, chosen)
    else:  # one global threshold can leave a matrix without entries: it stays as it is
      index = {p: i for p, i in _select(flat, chosen).items() if i.size}
    counted['entries'] = sum(int(np.prod(flat[p].shape)) for p in chosen)
    state = {}
    for path in index:
      w = flat[path]
      k = len(index[path])
      shape = {None: (k,), 0: (k, w.shape[1]), 1: (w.shape[0], k)}[axis]
      # Separate buffers: the trainer donates the state's, never the frozen tree's.
      flat[path] = SparseDelta(w, jnp.asarray(index[path], jnp.int32), jnp.zeros(shape, w.dtype),
                               axis)
      state[path] = {'values': jnp.zeros(shape, w.dtype)}
    return P.unflatten(flat), state

  def _select(flat, chosen):
    ref = {}
    if select == 'change':
      from peftjax.io.params_file import load_params  # pylint: disable=g-import-not-at-top
      ref = P.flatten(load_params(reference, P.unflatten(flat)))
    scored = {p: scores(select, flat[p], reference=ref.get(p), seed=seed, path=p)
              for p in chosen}
    if axis is not None:
      return {p: top_lines(s, max(1, round(density * s.shape[axis])), axis)
              for p, s in scored.items()}
    if per_matrix:
      return {p: top_entries({p: s}, max(1, round(density * s.size)))[p]
              for p, s in scored.items()}
    return top_entries(scored, max(1, round(density * sum(s.size for s in scored.values()))))

  def apply(frozen, state):
    return with_values(frozen, state, 'sparse_ft')

  def loss(state):
    if 'entries' not in counted:
      raise RuntimeError('sparse_ft: init must run before the L1 term is evaluated')
    total = sum(jnp.sum(jnp.abs(st['values'].astype(jnp.float32))) for st in state.values())
    return l1 * total / counted['entries']

  return Adapter(init=init, apply=apply, config=config, loss=loss if l1 else None,
                 describe=describe_values)


# ----------------------------------------------------------------------------- shared parts
def with_values(frozen, state, method: str):
  """`frozen` with each `SparseDelta` the state adapts holding the state's `values` (the
  `apply` of the sparse methods; `method` names the caller in errors)."""
  flat = P.flatten(frozen)
  for path, st in state.items():
    leaf = flat.get(path)
    if not isinstance(leaf, SparseDelta) or leaf.values.shape != st['values'].shape:
      raise ValueError(f'{method}: {path} holds {leaf!r} in the frozen tree, but the state '
                       f'has values of shape {tuple(st["values"].shape)}')
    flat[path] = SparseDelta(leaf.w, leaf.index, st['values'], leaf.axis)
  return P.unflatten(flat)


def describe_values(frozen, state) -> dict[str, dict]:
  """Per adapted matrix: its shape, the trained values and their fraction of its entries."""
  flat = P.flatten(frozen)
  return {path: {'shape': list(flat[path].shape), 'trainable': int(st['values'].size),
                 'density': float(st['values'].size / np.prod(flat[path].shape))}
          for path, st in state.items()}


def restored_indices(calib: Restored, chosen) -> dict[str, np.ndarray]:
  """The selected indices that an adapter file saved (`calib.Restored`), for each of the
  `chosen` paths it holds: a matrix where nothing was selected is neither saved nor adapted."""
  return {p: np.asarray(calib.frozen[f'{p}{P.SEP}index']) for p in chosen
          if f'{p}{P.SEP}index' in calib.frozen}


# ----------------------------------------------------------------------------- composition
def difference(frozen, state) -> dict[str, SparseDelta]:
  """The trained sparse difference `{path: SparseDelta}` of a `sparse_ft` run (its `w` is
  dropped: None), to `compose` onto any tree of the same shapes."""
  flat = P.flatten(frozen)
  return {path: SparseDelta(None, flat[path].index, st['values'], flat[path].axis)
          for path, st in state.items()}


def compose(params, *differences: dict[str, SparseDelta]):
  """`params` plus every sparse difference, added (overlapping entries sum): composing a
  task's and a domain's sparse fine-tunings, as LT-SFT does."""
  flat = P.flatten(params)
  for diff in differences:
    for path, d in diff.items():
      if path not in flat:
        raise ValueError(f'compose: the difference adapts {path}, which the params lack')
      w = flat[path]
      flat[path] = w + SparseDelta(jnp.zeros(w.shape, w.dtype), d.index, d.values,
                                   d.axis).delta().astype(w.dtype)
  return P.unflatten(flat)


def negate(difference: dict[str, SparseDelta]) -> dict[str, SparseDelta]:
  """The difference with its values negated: `compose(fused, negate(d))` takes a fused `d`
  off again (equal to the tree before up to rounding: `(w + v) - v` need not be `w`)."""
  return {path: SparseDelta(d.w, d.index, -d.values, d.axis) for path, d in difference.items()}
