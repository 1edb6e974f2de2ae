"""Shared pytest fixtures. Tests run with 8 CPU devices (for the sharding tests)."""
from __future__ import annotations

import os
import pathlib
import sys

if 'jax' in sys.modules:
  raise RuntimeError('conftest must set XLA_FLAGS before jax is imported')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

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
