"""Tests for KV-cached generation on a tiny random LLaMA: every cached step equals the
uncached full-sequence forward, batched prompts of different lengths, sampling, eos, LoRA."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import llama_reference as ref
import peftjax as pj
from peftjax.models.decode import generate
from peftjax.models.llama import Llama, LlamaConfig

TINY = LlamaConfig(vocab_size=96, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2,
                   intermediate_size=64, rope_theta=500.0, max_length=32)
# One batch shape for every test: generate compiles once per shape and param structure.
PROMPTS = np.random.default_rng(1).integers(0, TINY.vocab_size, (3, 7)).astype(np.int32)
LENGTHS, NEW = np.array([7, 2, 4]), 6


@pytest.fixture(scope='module')
def tiny():
  return Llama(TINY), ref.random_params(TINY, seed=1)


def _run(module, params, **kw):
  out = generate(module, params, PROMPTS, LENGTHS, max_new_tokens=NEW, return_logits=True, **kw)
  return jax.tree.map(np.asarray, out)


@functools.partial(jax.jit, static_argnums=0)
def _logits(module, params, ids, segment_ids, prefix):
  return pj.apply(module, params, ids, segment_ids=segment_ids, prefix=prefix)


def _full_logits(module, params, tokens, prefix_lm):
  """Uncached logits of the right-padded rows [prompt_i, new_i]."""
  ids = np.zeros((len(LENGTHS), PROMPTS.shape[1] + NEW), np.int32)
  seg = np.zeros_like(ids)
  for i, m in enumerate(LENGTHS):
    ids[i, :m], ids[i, m:m + NEW], seg[i, :m + NEW] = PROMPTS[i, :m], tokens[i], 1
  prefix = (np.arange(ids.shape[1])[None] < LENGTHS[:, None]) & prefix_lm
  return np.asarray(_logits(module, params, ids, seg, prefix))


@pytest.mark.parametrize('prefix_lm', [False, True])
def test_cached_logits_equal_uncached_at_every_step(tiny, prefix_lm):
  module, params = tiny
  out = _run(module, params, prefix_lm=prefix_lm)
  full = _full_logits(module, params, out.tokens, prefix_lm)
  for i, m in enumerate(LENGTHS):
    np.testing.assert_allclose(out.logits[i], full[i, m - 1:m - 1 + NEW], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(out.tokens, np.argmax(out.logits, -1))
  assert out.lengths.tolist() == [NEW] * 3 and not out.stopped.any()
  if prefix_lm:  # the prompt really was bidirectional
    assert np.abs(out.logits - _run(module, params).logits).max() > 1e-3


def test_sampling(tiny):
  module, params = tiny
  greedy = _run(module, params).tokens
  sample = lambda seed, **kw: _run(module, params, rng=jax.random.key(seed), **kw).tokens
  np.testing.assert_array_equal(sample(3, temperature=1.0, top_p=1e-6), greedy)
  hot = sample(4, temperature=2.0)
  np.testing.assert_array_equal(sample(4, temperature=2.0), hot)
  assert (sample(5, temperature=2.0) != hot).any() and (hot != greedy).any()
  # A nucleus of half the mass draws only tokens inside it.
  out = _run(module, params, rng=jax.random.key(4), temperature=2.0, top_p=0.5)
  probs = jax.nn.softmax(out.logits / 2.0)
  ranked = np.sort(np.asarray(probs), -1)[..., ::-1]
  chosen = np.take_along_axis(np.asarray(probs), out.tokens[..., None], -1)
  above = (ranked > chosen).astype(np.float64) * ranked  # mass ranked above the chosen token
  assert (above.sum(-1) < 0.5).all() and (out.tokens != hot).any()


def test_eos_stops_rows(tiny):
  module, params = tiny
  greedy = _run(module, params).tokens
  eos = int(greedy[1, 2])
  out = _run(module, params, eos_id=eos, pad_id=-1)
  for row, got, n, stopped in zip(greedy, out.tokens, out.lengths, out.stopped):
    first = list(row).index(eos) + 1 if eos in row else NEW
    assert n == first and stopped == (eos in row)
    np.testing.assert_array_equal(got[:first], row[:first])
    assert (got[first:] == -1).all()
  with pytest.raises(ValueError, match='max_new_tokens'):
    generate(module, params, PROMPTS, LENGTHS, max_new_tokens=TINY.max_length - 6)
  with pytest.raises(ValueError, match=r'prompt_lengths \[3\] in 1..7'):
    generate(module, params, PROMPTS, np.array([5, 0, 1]), max_new_tokens=2)
  with pytest.raises(ValueError, match='needs an rng'):
    generate(module, params, PROMPTS, LENGTHS, max_new_tokens=2, temperature=1.0)


def test_lora_params_generate_like_merged_ones(tiny):
  module, params = tiny
  adapter = pj.lora(['(q_proj|v_proj|down_proj)/kernel'], rank=2, alpha=4.0)
  frozen, state = adapter.init(jax.random.key(1), params)
  keys = iter(jax.random.split(jax.random.key(2), 100))
  state = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) / 4, state)
  out = _run(module, adapter.apply(frozen, state))
  merged = _run(module, pj.merge(adapter, frozen, state))
  np.testing.assert_array_equal(out.tokens, merged.tokens)
  np.testing.assert_allclose(out.logits, merged.logits, atol=1e-5, rtol=1e-5)
  assert np.abs(out.logits - _run(module, params).logits).max() > 1e-2
