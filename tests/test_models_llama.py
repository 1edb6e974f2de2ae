"""Tests for the LLaMA decoder on tiny random models: an independent numpy reference with
GGUF-permuted Q/K and interleaved rotary, packing, prefix LM, LoRA in the stock layers,
logical axes on 8 devices and `build`."""
from __future__ import annotations

import dataclasses
import functools
import re

import flax
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import llama_reference as ref
import peftjax as pj
from peftjax.models import TINY_LLAMA, build, smollm2
from peftjax.models.llama import Llama, LlamaConfig
from peftjax.parallel import sharding as PS
from peftjax.parallel.mesh import make_mesh

TINY = LlamaConfig(vocab_size=96, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2,
                   intermediate_size=64, rope_theta=500.0, max_length=64)
PROJ = r'(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel'


@functools.cache
def _tiny(tied: bool = True):
  cfg = dataclasses.replace(TINY, tie_embeddings=tied)
  return Llama(cfg), ref.random_params(cfg, seed=1)


@functools.partial(jax.jit, static_argnums=0)
def _logits(module, params, ids, segment_ids=None, positions=None, prefix=None):
  return pj.apply(module, params, ids, segment_ids=segment_ids, positions=positions,
                  prefix=prefix)


def _ids(seed, shape, vocab=TINY.vocab_size):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize('tied', [True, False])
def test_param_paths_mirror_hf_names(tied):
  _, params = _tiny(tied)
  paths = {'/'.join(k) for k in flax.traverse_util.flatten_dict(params)}
  want = {'embed_tokens/embedding', 'norm/scale'} | (set() if tied else {'lm_head/kernel'})
  for i in range(TINY.num_layers):
    want |= {f'layers_{i}/self_attn/{n}/kernel' for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj')}
    want |= {f'layers_{i}/mlp/{n}/kernel' for n in ('gate_proj', 'up_proj', 'down_proj')}
    want |= {f'layers_{i}/{n}/scale' for n in ('input_layernorm', 'post_attention_layernorm')}
  assert paths == want


@pytest.mark.parametrize('tied', [True, False])
def test_forward_matches_reference_with_permuted_qk(tied):
  module, params = _tiny(tied)
  ids = _ids(0, (12,))
  weights = ref.as_gguf(params, module.config).__getitem__
  want = ref.logits(weights, module.config, ids, module.config.rms_eps)
  np.testing.assert_allclose(_logits(module, params, ids[None])[0], want, atol=2e-5, rtol=1e-5)
  gaps = np.cumsum(np.random.default_rng(1).integers(1, 4, 12)) + 5  # RoPE reads `positions`
  want = ref.logits(weights, module.config, ids, module.config.rms_eps, positions=gaps)
  np.testing.assert_allclose(_logits(module, params, ids[None], positions=gaps[None])[0], want,
                             atol=2e-5, rtol=1e-5)


def test_packed_examples_do_not_interact():
  module, params = _tiny()
  run = lambda ids, **kw: np.asarray(_logits(module, params, ids[None], **kw)[0])
  parts = [_ids(4, (5,)), _ids(5, (3,)), _ids(6, (4,))]
  ids = np.concatenate(parts + [np.zeros(2, np.int32)])
  seg = np.repeat([1, 2, 3, 0], [5, 3, 4, 2])
  pos = np.concatenate([np.arange(5), np.arange(3), np.arange(4), [0, 0]])
  packed = run(ids, segment_ids=seg[None], positions=pos[None])
  changed = ids.copy()
  changed[5:8] = _ids(7, (3,))
  other = run(changed, segment_ids=seg[None], positions=pos[None])
  keep = seg != 2
  np.testing.assert_allclose(other[keep], packed[keep], atol=1e-5)
  assert np.abs(other[seg == 2] - packed[seg == 2]).max() > 1e-2
  for part, start in zip(parts, (0, 5, 8)):  # each equals its example run alone
    alone = np.pad(part, (0, len(ids) - len(part)))  # (same shape: one compilation)
    np.testing.assert_allclose(packed[start:start + len(part)], run(alone)[:len(part)],
                               atol=1e-5)


def test_prefix_is_bidirectional_then_causal():
  module, params = _tiny()
  n, k = 9, 4
  ids, prefix = _ids(8, (n,)), (np.arange(n) < k)[None]
  run = lambda x, prefix=prefix: np.asarray(_logits(module, params, x[None], prefix=prefix)[0])
  base = run(ids)
  for j in range(n):
    changed = ids.copy()
    changed[j] = (ids[j] + 1) % TINY.vocab_size
    moved = np.abs(run(changed) - base).max(-1) > 1e-4
    seen_by = np.arange(n) >= j if j >= k else np.ones(n, bool)
    np.testing.assert_array_equal(moved, seen_by, err_msg=f'token {j} changed')
  causal = run(ids, prefix=np.zeros_like(prefix))
  np.testing.assert_allclose(causal, np.asarray(_logits(module, params, ids[None])[0]), atol=1e-6)
  assert np.abs(causal[0] - base[0]).max() > 1e-3  # the first token saw the whole prefix


@pytest.mark.parametrize('tied', [True, False])
def test_lora_leaves_equal_merged_weights(tied):
  module, params = _tiny(tied)
  targets = [PROJ] if tied else [PROJ, 'lm_head/kernel', 'embed_tokens/embedding']
  adapter = pj.lora(targets, rank=2, alpha=4.0)
  frozen, state = adapter.init(jax.random.key(1), params)
  assert len(state) == 7 * TINY.num_layers + (0 if tied else 2)
  keys = iter(jax.random.split(jax.random.key(2), 100))
  state = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) / 4, state)
  structured, merged = adapter.apply(frozen, state), pj.merge(adapter, frozen, state)
  ids = _ids(9, (2, 10))
  ours = _logits(module, structured, ids)
  np.testing.assert_allclose(ours, _logits(module, merged, ids), atol=1e-5, rtol=1e-5)
  assert np.abs(ours - _logits(module, params, ids)).max() > 1e-2  # it adapts


def test_lora_on_a_tied_embedding_is_refused():
  module, params = _tiny()
  adapter = pj.lora(['embed_tokens/embedding'], rank=2)
  structured = adapter.apply(*adapter.init(jax.random.key(0), params))
  with pytest.raises(TypeError, match='ties it to the output head'):
    jax.eval_shape(lambda p: pj.apply(module, p, _ids(0, (1, 4))), structured)


def test_every_param_is_sharded_on_8_devices():
  model = build(ml_collections.ConfigDict({**TINY_LLAMA, 'tie_embeddings': False}))
  mesh = make_mesh(2, 2, 2)
  specs = PS.param_specs(model.params, model.logical_axes, mesh)
  for path, (spec, _) in specs.items():
    if path.endswith('norm/scale'):
      assert spec == P(None), path
    else:  # both axes sharded: no fall-back to replication
      assert len(spec) == 2 and None not in spec, (path, spec)
  assert specs['layers_0/self_attn/k_proj/kernel'][0] == P('fsdp', 'tensor')
  assert specs['layers_1/self_attn/o_proj/kernel'][0] == P('tensor', 'fsdp')
  assert specs['layers_1/mlp/down_proj/kernel'][0] == P('tensor', 'fsdp')
  assert specs['embed_tokens/embedding'][0] == P('tensor', 'fsdp')
  assert specs['lm_head/kernel'][0] == P('fsdp', 'tensor')
  placed = jax.device_put(model.params, PS.shardings(model.params, specs, mesh))
  q = placed['layers_0']['self_attn']['q_proj']['kernel']
  assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape == (16, 16)
  ids = _ids(10, (4, 8), TINY_LLAMA['vocab_size'])
  np.testing.assert_allclose(_logits(model.module, placed, ids),
                             _logits(model.module, model.params, ids), atol=1e-5)


def test_build(monkeypatch):
  model = build(ml_collections.ConfigDict(TINY_LLAMA), seed=3)
  assert model.model_id == 'random-llama-seed3' and model.module.config.num_kv_heads == 2
  remat = build(ml_collections.ConfigDict({**TINY_LLAMA, 'remat': True}), seed=3)
  jax.tree.map(np.testing.assert_array_equal, remat.params, model.params)
  ids = _ids(11, (2, 6), TINY_LLAMA['vocab_size'])
  remats = lambda m: len(re.findall(r'\b(?:remat\w*|checkpoint)\[',
                                     str(jax.make_jaxpr(m.apply)(m.params, ids))))
  assert (remats(remat), remats(model)) == (TINY_LLAMA['num_layers'], 0)
  monkeypatch.setattr(smollm2, 'load_smollm2', lambda: (TINY, ref.random_params(TINY, 0)))
  model = build(ml_collections.ConfigDict({'name': 'smollm2'}))
  assert model.model_id == smollm2.MODEL_ID == 'HuggingFaceTB/SmolLM2-135M-Instruct'
  with pytest.raises(ValueError, match="expected 'minilm', 'bert', 'smollm2', 'llama', 't5' or 'vit'"):
    build(ml_collections.ConfigDict({'name': 'gpt'}))
