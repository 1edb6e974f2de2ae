"""Device meshes with axes (data, fsdp, tensor), batch shardings, and joining a multi-host run.

`data` replicates the model and splits the batch; `fsdp` splits the batch *and* the params
(ZeRO-3 style: weights are gathered per use); `tensor` splits weights along heads / MLP width
(Megatron style). Which param axis goes to which mesh axis is decided by logical-axis rules
(`peftjax.parallel.sharding`).
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ('data', 'fsdp', 'tensor')
BATCH = ('data', 'fsdp')  # the mesh axes a batch's leading axis is split over


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take all remaining devices.

  A mesh may use fewer devices than there are (tests, ablations), but not in a multi-process
  run, where every process must own part of it.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(data), int(fsdp), int(tensor)]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh sizes (data, fsdp, tensor) = {tuple(sizes)}: expected positive '
                     'sizes, with at most one -1 (all remaining devices)')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'mesh {dict(zip(AXES, sizes))}: {len(devices)} devices are not '
                       f'divisible by the fixed axes ({known})')
    sizes[sizes.index(-1)] = len(devices) // known
  total = math.prod(sizes)
  if total > len(devices):
    raise ValueError(f'mesh {dict(zip(AXES, sizes))} needs {total} devices; '
                     f'{len(devices)} available')
  if total < len(devices) and jax.process_count() > 1:
    raise ValueError(f'mesh {dict(zip(AXES, sizes))} uses {total} of {len(devices)} devices; '
                     'a multi-process run must use all of them')
  try:  # Orders devices by the physical topology (TPU ICI rings, hosts along `data`).
    grid = mesh_utils.create_device_mesh(sizes, devices[:total])
  except (AssertionError, ValueError, NotImplementedError):
    grid = np.asarray(devices[:total]).reshape(sizes)
  return Mesh(grid, AXES)


def mesh_from_config(config) -> Mesh:
  """The mesh of a `config.mesh` with keys `data`, `fsdp`, `tensor` (missing: 1; data: -1)."""
  unknown = set(config.keys()) - set(AXES)
  if unknown:
    raise ValueError(f'unknown mesh keys {sorted(unknown)}; expected {AXES}')
  return make_mesh(config.get('data', -1), config.get('fsdp', 1), config.get('tensor', 1))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the `data` and `fsdp` axes."""
  return NamedSharding(mesh, PartitionSpec(BATCH))


def batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH)


def put(tree, shardings):
  """Host arrays (the same on every process) as global arrays with `shardings`; each process
  transfers only the pieces its own devices hold. In a single process a jax array goes by
  `jax.device_put`, which reuses its buffer where it already lies as asked (no copy)."""

  def one(x, sharding):
    if isinstance(x, jax.Array) and jax.process_count() == 1:
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, shardings), tree)
  return jax.tree.map(one, tree, shardings)


def host_rows(sharding, batch_size: int) -> slice:
  """The rows of a global batch that this process's devices hold (one contiguous block)."""
  spans = {(index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
           for index in sharding.addressable_devices_indices_map((batch_size,)).values()}
  lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != hi - lo:
    raise ValueError(f'this process holds rows {sorted(spans)} of the batch, not one block; '
                     'order the mesh so that each process owns consecutive batch shards')
  return slice(lo, hi)


def put_rows(rows, sharding, batch_size: int):
  """A global batch of `batch_size` rows from this process's rows (`host_rows`) of it."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      sharding, x, (batch_size, *x.shape[1:])), rows)


def fetch(tree):
  """Global arrays as host numpy arrays on every process (gathered across processes)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


ENV = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def init_distributed(config=None) -> bool:
  """Joins a multi-process run if one is asked for; returns whether this is one.

  Asked for by `config` (`coordinator_address`, `num_processes`, `process_id`; `auto=True`
  lets JAX detect a TPU pod, SLURM, MPI or Kubernetes job) or by the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Call it before anything
  touches a device. Calling it again is harmless.
  """
  config = dict(config or {})
  unknown = set(config) - {'coordinator_address', 'num_processes', 'process_id', 'auto'}
  if unknown:
    raise ValueError(f'unknown distributed keys {sorted(unknown)}; expected '
                     'coordinator_address, num_processes, process_id, auto')
  address = config.get('coordinator_address') or os.environ.get(ENV[0])
  num = config.get('num_processes') or os.environ.get(ENV[1])
  pid = config.get('process_id', -1)
  pid = os.environ.get(ENV[2]) if pid is None or int(pid) < 0 else pid
  if jax.distributed.is_initialized():
    return True
  if config.get('auto'):
    jax.distributed.initialize()
    return True
  if not address:
    return False
  if num is None or pid is None:
    raise ValueError(f'multi-process run at {address}: set num_processes and process_id '
                     f'(config.distributed or {ENV[1]} / {ENV[2]})')
  jax.distributed.initialize(address, int(num), int(pid))
  return True
