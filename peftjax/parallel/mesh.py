"""Device meshes and the shardings the trainer uses."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = 'data'


def make_mesh(data: int = -1) -> Mesh:
  """A 1-D mesh over `data` devices (-1: all local devices)."""
  devices = jax.devices()
  n = len(devices) if data == -1 else data
  if not 1 <= n <= len(devices):
    raise ValueError(f'mesh needs {n} devices on the data axis; {len(devices)} available')
  return Mesh(np.asarray(devices[:n]), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, PartitionSpec(DATA))
