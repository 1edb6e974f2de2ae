"""Tests for the BERT encoder and the MiniLM loader against an independent HF reference."""
from __future__ import annotations

import json
import pathlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from peftjax.core import leaves
from peftjax.models import bert
from peftjax.models import minilm

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'minilm_reference.npz'
TINY = bert.BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                       intermediate_size=64, max_position_embeddings=16)


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope='module')
def loaded(minilm_dir):
  return minilm.load_minilm(minilm_dir)


@pytest.fixture(scope='module')
def outputs(loaded, golden):
  config, params = loaded
  hidden = jax.jit(bert.Bert(config).apply)({'params': params}, golden['input_ids'],
                                           golden['attention_mask'])
  return np.asarray(hidden), np.asarray(bert.mean_pool(hidden, golden['attention_mask']))


def _paths(tree):
  return sorted('/'.join(k) for k in flax.traverse_util.flatten_dict(tree))


def _documented_paths(num_layers):
  paths = [f'embeddings/{n}/embedding' for n in ('word', 'position', 'token_type')]
  paths += ['embeddings/norm/scale', 'embeddings/norm/bias']
  for i in range(num_layers):
    layer = f'encoder/layer_{i}'
    for name in ('query', 'key', 'value', 'output'):
      paths += [f'{layer}/attention/{name}/kernel', f'{layer}/attention/{name}/bias']
    for name in ('intermediate', 'output'):
      paths += [f'{layer}/{name}/kernel', f'{layer}/{name}/bias']
    for name in ('attention_norm', 'output_norm'):
      paths += [f'{layer}/{name}/scale', f'{layer}/{name}/bias']
  return sorted(paths)


def test_golden_file_is_small_and_versioned(golden):
  assert GOLDEN.stat().st_size < 200_000
  assert any(v.startswith('torch==') for v in golden['versions'])
  assert any(v.startswith('transformers==') for v in golden['versions'])


def test_tokenizer_matches_reference(minilm_dir, golden):
  tok = minilm.load_tokenizer(minilm_dir)
  encodings = tok.encode_batch([str(s) for s in golden['sentences']])
  for enc, ids, mask in zip(encodings, golden['input_ids'], golden['attention_mask']):
    n = int(mask.sum())
    assert enc.ids == ids[:n].tolist()
    assert not ids[n:].any()
  long = tok.encode('word ' * 200)
  assert len(long.ids) == 64 and long.tokens[-1] == '[SEP]'
  assert len(minilm.load_tokenizer(minilm_dir, max_length=16).encode('word ' * 200).ids) == 16


def test_forward_matches_reference(outputs, golden):
  hidden, emb = outputs
  assert hidden.dtype == np.float32
  np.testing.assert_allclose(hidden, golden['last_hidden_state'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(emb, golden['embeddings'], atol=1e-4, rtol=0)


def test_sentence_similarity(outputs, golden):
  _, emb = outputs
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  sentences = [str(s) for s in golden['sentences']]
  food = sentences.index('A man is eating food.')
  bread = sentences.index('A man is eating a piece of bread.')
  cos = emb @ emb.T
  assert cos[food, bread] == pytest.approx(0.755, abs=0.01)
  others = [i for i in range(len(sentences)) if i not in (food, bread)]
  assert np.abs(cos[np.ix_([food, bread], others)]).max() < 0.3


def test_loaded_params_match_model_tree(loaded):
  config, params = loaded
  assert _paths(params) == _documented_paths(config.num_layers)
  shapes = jax.eval_shape(bert.Bert(config).init, jax.random.key(0),
                          jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  flat = flax.traverse_util.flatten_dict(params)
  for path, spec in flax.traverse_util.flatten_dict(shapes['params']).items():
    assert flat[path].shape == spec.shape and flat[path].dtype == np.float32, path


def _write_tiny_checkpoint(tmp_path, drop=None, reshape=None, extra=None):
  """Writes a tiny HF-named checkpoint; `reshape` maps a name to a wrong shape."""
  hf_config = {'vocab_size': 10, 'hidden_size': 4, 'num_hidden_layers': 1,
               'num_attention_heads': 2, 'intermediate_size': 8,
               'max_position_embeddings': 6, 'type_vocab_size': 2, 'hidden_act': 'gelu'}
  (tmp_path / 'config.json').write_text(json.dumps(hf_config))
  config = bert.BertConfig.from_hf(hf_config)
  rng = np.random.default_rng(0)
  state = {'embeddings.position_ids': np.arange(6, dtype=np.int64)[None],
           'pooler.dense.weight': np.zeros((4, 4), np.float32),
           'pooler.dense.bias': np.zeros((4,), np.float32)}
  for name, (path, shape) in minilm.hf_name_map(config).items():
    hf_shape = shape[::-1] if path[-1] == 'kernel' else shape
    state[name] = rng.normal(size=hf_shape).astype(np.float32)
  for name, shape in (reshape or {}).items():
    state[name] = np.zeros(shape, np.float32)
  state.update(extra or {})
  if drop:
    del state[drop]
  save_file(state, str(tmp_path / 'model.safetensors'))
  return state


def test_loader_accepts_tiny_checkpoint(tmp_path):
  state = _write_tiny_checkpoint(tmp_path)
  config, params = minilm.load_minilm(tmp_path)
  assert config.hidden_size == 4 and config.num_layers == 1
  np.testing.assert_array_equal(params['encoder']['layer_0']['attention']['query']['kernel'],
                                state['encoder.layer.0.attention.self.query.weight'].T)
  np.testing.assert_array_equal(params['encoder']['layer_0']['output_norm']['scale'],
                                state['encoder.layer.0.output.LayerNorm.weight'])
  assert _paths(params) == _documented_paths(1)


def test_loader_rejects_wrong_shape(tmp_path):
  name = 'encoder.layer.0.attention.self.query.weight'
  _write_tiny_checkpoint(tmp_path, reshape={name: (4, 5)})
  with pytest.raises(ValueError, match=r'query\.weight.*expected shape \(4, 4\).*found \(4, 5\)'):
    minilm.load_minilm(tmp_path)
  _write_tiny_checkpoint(tmp_path, reshape={'embeddings.word_embeddings.weight': (11, 4)})
  with pytest.raises(ValueError, match=r'word_embeddings.*expected shape \(10, 4\).*found'):
    minilm.load_minilm(tmp_path)


def test_loader_rejects_missing_and_unexpected(tmp_path):
  _write_tiny_checkpoint(tmp_path, drop='encoder.layer.0.output.dense.bias')
  with pytest.raises(ValueError, match=r'missing.*encoder\.layer\.0\.output\.dense\.bias'):
    minilm.load_minilm(tmp_path)
  _write_tiny_checkpoint(tmp_path, extra={'encoder.layer.1.output.dense.bias': np.zeros(4)})
  with pytest.raises(ValueError, match=r'unexpected.*encoder\.layer\.1\.output\.dense\.bias'):
    minilm.load_minilm(tmp_path)


def test_config_rejects_unsupported_variants():
  base = {'vocab_size': 10, 'hidden_size': 4, 'num_hidden_layers': 1,
          'num_attention_heads': 2, 'intermediate_size': 8}
  assert bert.BertConfig.from_hf(base).layer_norm_eps == 1e-12
  with pytest.raises(ValueError, match='hidden_act'):
    bert.BertConfig.from_hf({**base, 'hidden_act': 'gelu_new'})
  with pytest.raises(ValueError, match='position_embedding_type'):
    bert.BertConfig.from_hf({**base, 'position_embedding_type': 'relative_key'})


@pytest.fixture(scope='module')
def tiny():
  model = bert.Bert(TINY)
  ids = jax.random.randint(jax.random.key(1), (2, 7), 1, TINY.vocab_size)
  mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)
  params = model.init(jax.random.key(0), ids, mask)['params']
  return model, params, ids, mask


def test_param_tree_paths(tiny):
  _, params, _, _ = tiny
  assert _paths(params) == _documented_paths(TINY.num_layers)
  assert params['encoder']['layer_1']['intermediate']['kernel'].shape == (32, 64)


def test_dropout_only_in_training(tiny):
  model, params, ids, mask = tiny
  variables = {'params': params}
  eval_out = model.apply(variables, ids, mask)
  assert eval_out.shape == (2, 7, 32)
  np.testing.assert_array_equal(eval_out, model.apply(variables, ids, mask, train=False))
  train_a = model.apply(variables, ids, mask, train=True, rngs={'dropout': jax.random.key(2)})
  train_b = model.apply(variables, ids, mask, train=True, rngs={'dropout': jax.random.key(2)})
  train_c = model.apply(variables, ids, mask, train=True, rngs={'dropout': jax.random.key(3)})
  assert np.all(np.isfinite(train_a))
  np.testing.assert_array_equal(train_a, train_b)
  assert not np.allclose(train_a, eval_out, atol=1e-3)
  assert not np.allclose(train_a, train_c, atol=1e-3)


def test_padding_does_not_leak(tiny):
  model, params, ids, mask = tiny
  full = model.apply({'params': params}, ids, mask)
  short = model.apply({'params': params}, ids[1:, :4], mask[1:, :4])
  np.testing.assert_allclose(full[1, :4], short[0], atol=1e-5)
  np.testing.assert_allclose(bert.mean_pool(full, mask)[1], short[0].mean(0), atol=1e-5)


def test_structured_kernel_runs_through_dense(tiny):
  model, params, ids, mask = tiny
  k = jax.random.split(jax.random.key(4), 2)
  attn = params['encoder']['layer_0']['attention']
  lowrank = leaves.LowRank(attn['query']['kernel'], jax.random.normal(k[0], (32, 2)),
                           jax.random.normal(k[1], (2, 32)), scale=0.5, dropout=0.5)
  patched = jax.tree.map(lambda x: x, params)
  patched['encoder']['layer_0']['attention']['query']['kernel'] = lowrank
  out = model.apply({'params': patched}, ids, mask)
  dense = model.apply({'params': leaves.materialize(patched)}, ids, mask)
  np.testing.assert_allclose(out, dense, atol=1e-5)
  assert not np.allclose(out, model.apply({'params': params}, ids, mask), atol=1e-3)


def test_layer_norm_and_gelu_keep_only_their_inputs_for_the_backward_pass():
  """`bert.LayerNorm` and `bert.gelu` give flax's LayerNorm's and the exact GELU's values and
  gradients, and the compiled backward pass through frozen blocks of them (as in S2FT or
  LoRA, where only the input gradient flows) needs less memory: their inputs alone stay."""
  class Blocks(nn.Module):
    norm: type
    act: object

    @nn.compact
    def __call__(self, x):
      for i in range(4):
        w = self.param(f'w{i}', nn.initializers.normal(0.1), (x.shape[-1], 4 * x.shape[-1]))
        x = self.norm(name=f'norm{i}')(x + self.act(x @ w) @ w.T)
      return x

  x = jax.random.normal(jax.random.key(0), (512, 64))
  plain = Blocks(nn.LayerNorm, lambda h: jax.nn.gelu(h, approximate=False))
  ours = Blocks(bert.LayerNorm, bert.gelu)
  params = plain.init(jax.random.key(1), x)
  assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(params)
  # Non-trivial norm params, so that their gradients count.
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape),
                        params)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  np.testing.assert_allclose(ours.apply(params, x), plain.apply(params, x), atol=1e-6)
  for argnums in (0, 1):
    want = jax.grad(loss(plain), argnums)(params, x)
    got = jax.grad(loss(ours), argnums)(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got,
                 want)

  def temporaries(m):  # only the input's gradient: the blocks frozen
    step = jax.jit(jax.grad(loss(m), argnums=1)).lower(params, x).compile()
    return step.memory_analysis().temp_size_in_bytes

  size = x.size * 4  # bytes of one (tokens, hidden) array; the GELU's are 4x that
  gelu_only = temporaries(Blocks(nn.LayerNorm, bert.gelu))
  # The GELU keeps two fewer of its arrays (in 3 blocks of 4 at least), the LayerNorm no
  # x - mean (in 2 at least).
  assert gelu_only < temporaries(plain) - 3 * 2 * 4 * size, (gelu_only, temporaries(plain))
  assert temporaries(ours) < gelu_only - 2 * size, (temporaries(ours), gelu_only)
