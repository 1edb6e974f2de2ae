"""Shardings of param, adapter and optimiser trees from logical-axis rules (t5x-style).

A model names the axes of each of its params logically (`Model.logical_axes`, e.g. a
query kernel is `('embed', 'heads')`); `RULES` map logical names to mesh axes. Every other
tree the trainer holds inherits from the base weights by path: any leaf whose slash path
contains a base param's path (an adapter state `{path: {'a', 'b'}}`, a frozen `LowRank`
leaf, the optimiser's moments of either) takes that param's sharding:

- a leaf of the param's shape: the param's spec;
- a leaf of the param's rank, e.g. a low-rank factor (in x r, r x out) whatever its key: each
  dimension of the param's size there is sharded like the param's, the others (the rank)
  not (as qwix and MaxText shard LoRA);
- a vector over the param's out (or in) axis, e.g. SSF / (IA)³ scales and shifts or a
  `Scaled` leaf's `scale`: that axis's spec (the out axis where both fit);
- a sparse selection's entries (a 1-D `index` or `values` of a `SparseDelta` or of a sparse
  state, one element per selected entry): split over all the mesh axes that shard the param,
  where they divide the count, so each device holds a share of the entries and of their
  optimiser moments (row and column selections follow the rank rule above);
- anything else (ranks' singular values, scalars, the head, step counters): replicated; so are
  bottleneck adapters' weights (keyed by a module's path, which holds no param): in·r + r·out
  per module, small beside the weights.

A mesh axis is dropped from a spec where it does not divide the dimension, so any mesh
shape works for any model.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from peftjax.core import paths as P

log = logging.getLogger(__name__)

# (logical axis, mesh axes) pairs; the first rule naming an axis wins.
RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('norm', None),
    ('position', None),
)

def axes_from_table(table: Sequence[tuple[str, tuple]]) -> Callable[[str], tuple]:
  """`path -> logical axes` from `(regex, axes)` rows; the first row that matches wins."""
  rows = dict(table)

  def axes(path: str) -> tuple:
    names = P.first_match(path, rows, None)
    if names is None:
      raise ValueError(f'no logical axes for param {path!r}; the model\'s table has patterns '
                       f'{list(rows)}')
    return names

  return axes


def logical_to_spec(names: Sequence[str | None], shape, mesh: Mesh,
                    rules=RULES) -> PartitionSpec:
  """The PartitionSpec of an array with logical axis `names` under `rules`."""
  if len(names) != len(shape):
    raise ValueError(f'logical axes {tuple(names)} do not fit an array of shape {tuple(shape)}')
  table = {}
  for name, mesh_axes in rules:
    table.setdefault(name, mesh_axes)
  used, spec = set(), []
  for name, dim in zip(names, shape):
    if name is not None and name not in table:
      raise ValueError(f'logical axis {name!r} has no rule; rules name {sorted(table)}')
    spec.append(_fit(table.get(name), dim, mesh, used))
  return PartitionSpec(*spec)


def _fit(mesh_axes, dim: int, mesh: Mesh, used: set):
  """The mesh axes (of `mesh_axes`) that are unused, larger than 1 and divide `dim`."""
  if mesh_axes is None:
    return None
  kept, size = [], 1
  for axis in (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes:
    n = mesh.shape[axis]
    if axis in used or n == 1 or dim % (size * n):
      continue
    kept.append(axis)
    size *= n
  used.update(kept)
  return None if not kept else kept[0] if len(kept) == 1 else tuple(kept)


def param_specs(params, logical_axes: Callable[[str], tuple] | None, mesh: Mesh,
                rules=RULES) -> dict[str, tuple[PartitionSpec, tuple]]:
  """`{slash path: (spec, shape)}` for every param of a (plain) model tree. Without
  `logical_axes` (a model that names none) every param is replicated: right for data
  parallelism; on a mesh that would shard weights (fsdp or tensor > 1) a warning says how to
  name them (`axes_from_table`)."""
  flat = P.flatten(params)
  if logical_axes is None:
    if mesh.size > mesh.shape.get('data', 1):
      log.warning('the model names no logical axes, so its weights are replicated over the '
                  'mesh %s instead of sharded; give the Model logical_axes (e.g. '
                  'peftjax.parallel.sharding.axes_from_table([(regex, axes), ...])) to shard '
                  'them', dict(mesh.shape))
    return {path: (PartitionSpec(), tuple(x.shape)) for path, x in flat.items()}
  return {path: (logical_to_spec(logical_axes(path), x.shape, mesh, rules), tuple(x.shape))
          for path, x in flat.items()}


def shardings(tree, base: dict[str, tuple[PartitionSpec, tuple]], mesh: Mesh):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs), inherited from
  the base params `base` (from `param_specs`) as the module docstring says."""

  def one(key_path, x):
    return NamedSharding(mesh, _inherit(P.path_str(key_path).split(P.SEP), tuple(x.shape), base,
                                        mesh))

  return jax.tree_util.tree_map_with_path(one, tree)


def _inherit(segments: list[str], shape: tuple, base, mesh: Mesh) -> PartitionSpec:
  for i in range(len(segments)):
    for j in range(len(segments), i, -1):
      hit = base.get(P.SEP.join(segments[i:j]))
      if hit is not None:
        if len(shape) == 1 and segments[-1] in SPARSE_KEYS and j < len(segments):
          return _entries(shape[0], hit[0], mesh)
        return _derived(shape, *hit)
  return PartitionSpec()


SPARSE_KEYS = ('index', 'values')


def _entries(count: int, spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """Selected entries split over the mesh axes of the param's `spec` that divide `count`."""
  axes = [a for part in spec if part is not None
          for a in ((part,) if isinstance(part, str) else part)]
  return PartitionSpec(_fit(tuple(axes), count, mesh, set()) if axes else None)


def _derived(shape: tuple, spec: PartitionSpec, base_shape: tuple):
  spec = tuple(spec) + (None,) * (len(base_shape) - len(spec))
  if len(shape) == len(base_shape):
    kept = [s if n == m else None for s, n, m in zip(spec, shape, base_shape)]
    return PartitionSpec(*kept) if any(kept) or shape == base_shape else PartitionSpec()
  if len(shape) == 1:
    for axis in reversed(range(len(base_shape))):  # the out axis first
      if base_shape[axis] == shape[0]:
        return PartitionSpec(spec[axis])
  return PartitionSpec()
