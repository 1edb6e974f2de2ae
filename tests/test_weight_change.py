"""peftjax.analysis.relative_change: ||W_adapted - W|| / ||W|| from a saved adapter."""
from __future__ import annotations

import jax
import numpy as np

import peftjax as pj
from peftjax.analysis import relative_change
from peftjax.io.adapter_file import save_adapter


def test_relative_change_of_a_saved_lora(tmp_path):
  rng = np.random.default_rng(0)
  params = {'layer': {'kernel': rng.normal(size=(6, 5)).astype(np.float32),
                      'bias': np.zeros(5, np.float32)},
            'other': {'kernel': rng.normal(size=(5, 4)).astype(np.float32)}}
  adapter = pj.lora('layer/kernel', rank=2, alpha=4.0)
  frozen, state = adapter.init(jax.random.key(0), params)
  state = {'layer/kernel': {'a': rng.normal(size=(6, 2)).astype(np.float32),
                            'b': rng.normal(size=(2, 5)).astype(np.float32)}}
  save_adapter(tmp_path, adapter, frozen, state)
  delta = 2.0 * state['layer/kernel']['a'] @ state['layer/kernel']['b']
  expected = np.linalg.norm(delta) / np.linalg.norm(params['layer']['kernel'])
  change = relative_change(tmp_path, params)
  assert list(change) == ['layer/kernel']  # the untouched kernel is not listed
  np.testing.assert_allclose(change['layer/kernel'], expected, rtol=1e-5)
