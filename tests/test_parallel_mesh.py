"""Meshes over the 8 fake CPU devices, host <-> global array transfer, distributed config."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from peftjax.parallel import mesh as M


def test_mesh_sizes_and_remaining_devices():
  assert jax.device_count() == 8
  assert dict(M.make_mesh().shape) == {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert dict(M.make_mesh(2, -1, 2).shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert dict(M.make_mesh(1).shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}
  assert M.batch_shards(M.make_mesh(2, 2, 2)) == 4


@pytest.mark.parametrize('sizes, message', [
    ((-1, -1, 1), 'at most one -1'),
    ((0, 1, 1), 'positive'),
    ((-1, 3, 1), 'not divisible'),
    ((4, 4, 1), 'needs 16 devices; 8 available'),
])
def test_bad_mesh_sizes_say_what_was_wrong(sizes, message):
  with pytest.raises(ValueError, match=message):
    M.make_mesh(*sizes)


def test_unknown_mesh_key_is_an_error():
  with pytest.raises(ValueError, match=r"unknown mesh keys \['model'\]"):
    M.mesh_from_config({'data': 2, 'model': 4})


def test_put_and_fetch_round_trip_with_any_sharding():
  mesh = M.make_mesh(2, 2, 2)
  x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
  for spec in [M.batch_sharded(mesh), M.replicated(mesh),
               jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'tensor'))]:
    y = M.put({'x': x}, spec)['x']
    assert y.sharding == spec
    np.testing.assert_array_equal(M.fetch(y), x)


def test_one_process_holds_every_row_and_builds_the_global_batch():
  mesh = M.make_mesh(2, 2, 2)
  assert M.host_rows(M.batch_sharded(mesh), 16) == slice(0, 16)
  assert M.host_rows(M.replicated(mesh), 16) == slice(0, 16)
  rows = {'ids': np.arange(32).reshape(16, 2)}
  batch = M.put_rows(rows, M.batch_sharded(mesh), 16)['ids']
  assert batch.sharding == M.batch_sharded(mesh)
  np.testing.assert_array_equal(M.fetch(batch), rows['ids'])


def test_distributed_is_off_unless_asked(monkeypatch):
  for name in M.ENV:
    monkeypatch.delenv(name, raising=False)
  assert M.init_distributed({'coordinator_address': '', 'num_processes': 0,
                             'process_id': -1, 'auto': False}) is False
  with pytest.raises(ValueError, match='unknown distributed keys'):
    M.init_distributed({'coordinator': 'localhost:1234'})
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'localhost:1234')
  with pytest.raises(ValueError, match='set num_processes and process_id'):
    M.init_distributed({})
