"""Shared pytest fixtures. Tests run with 8 CPU devices (for the sharding tests)."""
from __future__ import annotations

import os
import pathlib
import sys

if 'jax' in sys.modules:
  raise RuntimeError('conftest must set XLA_FLAGS before jax is imported')
# First: XLA ignores the flags after one it cannot parse.
os.environ['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=8 ' +
                           os.environ.get('XLA_FLAGS', '')).strip()

import pytest

from peftjax.data import assets


@pytest.fixture(scope='session')
def minilm_dir() -> pathlib.Path:
  """Folder of the fetched all-MiniLM-L6-v2 asset; raises with the fetch command if absent."""
  return assets.asset_path('minilm')


@pytest.fixture(scope='session')
def vader_dir() -> pathlib.Path:
  """Folder of the fetched VADER ground-truth files; raises with the fetch command if absent."""
  return assets.asset_path('vader')


@pytest.fixture(scope='session')
def optimizer_input():
  """`read(adapter, grads, trainable, lr=, clip_norm=)`: the gradients `make_optimizer` hands
  to AdamW after clipping and the method's transform, read off one step: with b1 = b2 = 0,
  no weight decay and eps = 1e8 the update is -lr * g / (|g| + eps), linear in g."""
  import jax
  import ml_collections

  from peftjax.train.step import make_optimizer

  eps = 1e8

  def read(adapter, grads, trainable, *, lr=1e-2, clip_norm=0.0):
    config = ml_collections.ConfigDict({'lr': lr, 'weight_decay': 0.0, 'b1': 0.0, 'b2': 0.0,
                                        'eps': eps, 'schedule': 'constant', 'clip_norm': clip_norm})
    tx = make_optimizer(config, adapter)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    return jax.tree.map(lambda u: -u * eps / lr, updates)

  return read
