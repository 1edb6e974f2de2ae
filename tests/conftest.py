"""Shared pytest fixtures."""
from __future__ import annotations

import pathlib

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
