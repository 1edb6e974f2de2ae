"""T5 against HF transformers outputs, Mesh TF's relative buckets, packing, causality, tied
logits, LoRA, sharding, cached decoding, and a short overfitting run."""
from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import peftjax as pj
from peftjax.core import linen
from peftjax.models import build, t5
from peftjax.models.bert import mean_pool
from peftjax.parallel import sharding as PS
from peftjax.parallel.mesh import make_mesh
from peftjax.tasks.classification import SentenceClassification

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 't5_reference.npz'
TINY = dict(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64, encoder_layers=1,
            decoder_layers=1, dropout=0.0)
B, LE, LD = 8, 14, 9  # one batch shape for most tests: one compilation


@pytest.fixture(scope='module')
def tiny():
  return t5.init(t5.T5Config(**TINY), 0)


def _ids(rng, shape, vocab=TINY['vocab_size']):
  return jnp.asarray(rng.integers(2, vocab, shape), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(module, params, enc, dec, enc_seg, dec_seg, enc_pos, dec_pos):
  keep = lambda m, _: isinstance(m, (t5.Encoder, t5.Decoder)) or m.name == 'relative_bias'
  with linen.structured_layers():
    logits, state = module.apply(
        {'params': params}, enc, dec, encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg,
        encoder_positions=enc_pos, decoder_positions=dec_pos, capture_intermediates=keep,
        mutable=['intermediates'])
  got = state['intermediates']
  return logits, {'encoded': got['encoder']['__call__'][0],
                  'states': got['decoder']['__call__'][0],
                  'encoder_bias': got['encoder']['relative_bias']['__call__'][0],
                  'decoder_bias': got['decoder']['relative_bias']['__call__'][0]}


def forward(module, params, enc, dec, enc_seg=None, dec_seg=None, enc_pos=None, dec_pos=None):
  """`(logits, {'encoded', 'states' (the decoder's), 'encoder_bias', 'decoder_bias'})` as
  numpy; segment ids default to ones, positions to 0, 1, ... (params may be structured)."""
  def fill(given, ids, default):
    return default(ids.shape) if given is None else given

  ones = lambda shape: np.ones(shape, np.int32)
  arange = lambda shape: np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape)
  out = _forward(module, params, enc, dec, fill(enc_seg, enc, ones), fill(dec_seg, dec, ones),
                 fill(enc_pos, enc, arange), fill(dec_pos, dec, arange))
  return jax.tree.map(np.asarray, out)


# --- relative position buckets ------------------------------------------------------------

def _mtf_bucket(relative_position, bidirectional, num_buckets, max_distance):
  """Mesh TF `transformer/attention.py` `_relative_position_bucket`, transcribed to numpy."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  with np.errstate(all='ignore'):
    val_if_large = max_exact + (
        np.log(n.astype(np.float32) / max_exact) / np.log(max_distance / max_exact)
        * (num_buckets - max_exact)).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(is_small, n, val_if_large)


@pytest.mark.parametrize('buckets,distance', [(32, 128), (8, 16), (64, 200)])
@pytest.mark.parametrize('bidirectional', [True, False])
def test_buckets_equal_mesh_tf(buckets, distance, bidirectional):
  rel = np.arange(-400, 401)
  got = t5.relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=buckets,
                                    max_distance=distance)
  np.testing.assert_array_equal(got, _mtf_bucket(rel, bidirectional, buckets, distance))


def test_buckets_hand_worked():
  # relative position = key - query. Bidirectional, 32 buckets: 16 per direction, 8 exact,
  # then 8 + floor(log(d / 8) / log(128 / 8) * 8); keys after the query take 16 + that.
  bi = {0: 0, -1: 1, 1: 17, -7: 7, -8: 8, -15: 9, -16: 10, -32: 12, -64: 14, -127: 15,
        -128: 15, -1000: 15, 7: 23, 16: 26, 200: 31}
  # Causal, 32 buckets: 16 exact, then 16 + floor(log(d / 16) / log(128 / 16) * 16); keys
  # after the query fall in bucket 0.
  causal = {0: 0, 5: 0, -1: 1, -15: 15, -16: 16, -32: 21, -64: 26, -127: 31, -128: 31,
            -500: 31}
  for table, bidirectional in ((bi, True), (causal, False)):
    rel = np.array(list(table))
    got = t5.relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32,
                                      max_distance=128)
    np.testing.assert_array_equal(got, list(table.values()), err_msg=f'{bidirectional=}')


def test_stacks_use_their_buckets_from_the_given_positions(tiny):
  # A bias table whose every head holds the bucket index shows the buckets each stack used.
  params = jax.tree_util.tree_map_with_path(
      lambda kp, x: (jnp.arange(32.0)[:, None] * jnp.ones(x.shape) if 'relative_bias' in
                     jax.tree_util.keystr(kp) else x), tiny.params)
  enc_pos = np.broadcast_to(np.arange(LE, dtype=np.int32), (B, LE)).copy()
  dec_pos = np.broadcast_to(np.arange(LD, dtype=np.int32), (B, LD)).copy()
  enc_pos[1] = [0, 1, 2, 3, 4, 0, 1, 2, 5, 9, 30, 31, 60, 100]
  dec_pos[1] = [0, 1, 2, 0, 1, 2, 3, 20, 40]
  ones = jnp.ones((B, LE), jnp.int32)
  _, got = forward(tiny.module, params, ones, ones[:, :LD], enc_pos=enc_pos, dec_pos=dec_pos)
  for stack, pos, bidirectional in (('encoder', enc_pos, True), ('decoder', dec_pos, False)):
    for row in (0, 1):
      np.testing.assert_array_equal(
          got[f'{stack}_bias'][row, ..., 3],
          _mtf_bucket(pos[row][None, :] - pos[row][:, None], bidirectional, 32, 128), stack)


# --- against HF transformers ----------------------------------------------------------------

def _from_hf(hf: dict, cfg: t5.T5Config) -> dict:
  """A T5 tree from a HF `T5ForConditionalGeneration` state dict (torch Linear: [out, in])."""
  proj = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'output'}
  tree = {'token_embedder': {'embedding': hf['shared.weight']}}
  for stack, layers in (('encoder', cfg.encoder_layers), ('decoder', cfg.decoder_layers)):
    subs = [('attention', 'SelfAttention')]
    subs += [('cross_attention', 'EncDecAttention')] if stack == 'decoder' else []
    table = hf[f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight']
    tree[stack] = {'relative_bias': {'embedding': table},
                   'final_norm': {'scale': hf[f'{stack}.final_layer_norm.weight']}}
    for i in range(layers):
      pre, layer = f'{stack}.block.{i}.layer', {}
      for j, (mine, theirs) in enumerate(subs):
        layer[mine] = {proj[p]: {'kernel': hf[f'{pre}.{j}.{theirs}.{p}.weight'].T} for p in proj}
        layer[f'{mine}_norm'] = {'scale': hf[f'{pre}.{j}.layer_norm.weight']}
      ff = f'{pre}.{len(subs)}'
      layer['mlp'] = {w: {'kernel': hf[f'{ff}.DenseReluDense.{w}.weight'].T}
                      for w in ('wi', 'wi_0', 'wi_1', 'wo')
                      if f'{ff}.DenseReluDense.{w}.weight' in hf}
      layer['mlp_norm'] = {'scale': hf[f'{ff}.layer_norm.weight']}
      tree[stack][f'layer_{i}'] = layer
  if 'lm_head.weight' in hf:
    tree['lm_head'] = {'kernel': hf['lm_head.weight'].T}
  return tree


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN) as z:
    return {k: z[k] for k in z.files}


@pytest.mark.parametrize('name,ff,tied,buckets,distance', [
    ('t5_1_1', 'gated-gelu', False, 32, 128), ('t5', 'relu', True, 8, 16)])
def test_matches_hf_transformers(golden, name, ff, tied, buckets, distance):
  assert any(v.startswith('transformers==') for v in golden['versions'])
  cfg = t5.T5Config(vocab_size=48, d_model=16, num_heads=4, head_dim=4, d_ff=32,
                    encoder_layers=2, decoder_layers=2, relative_buckets=buckets,
                    relative_max_distance=distance, feed_forward=ff, tie_embeddings=tied)
  g = {k[len(name) + 1:]: v for k, v in golden.items() if k.startswith(name + '/')}
  params = _from_hf({k[3:]: v for k, v in g.items() if k.startswith('hf/')}, cfg)
  module = t5.T5(cfg)
  ids = jnp.ones((1, 4), jnp.int32)
  want = jax.eval_shape(module.init, jax.random.key(0), ids, ids)['params']
  assert jax.tree.structure(want) == jax.tree.structure(params)
  logits, got = forward(module, params, g['encoder_ids'], g['decoder_ids'],
                        g['encoder_mask'], g['decoder_mask'])
  dec, enc = g['decoder_mask'].astype(bool), g['encoder_mask'].astype(bool)
  np.testing.assert_allclose(logits[dec], g['logits'][dec], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got['encoded'][enc], g['encoded'][enc], atol=1e-5, rtol=1e-5)
  if name == 't5_1_1':  # (the other's greedy tokens are all alike)
    tokens = t5.generate(module, params, g['encoder_ids'], max_length=g['generated'].shape[1] - 1,
                         encoder_segment_ids=g['encoder_mask'])
    np.testing.assert_array_equal(tokens, g['generated'][:, 1:])  # EOS, then padding


# --- packing, causality, logits -------------------------------------------------------------

def test_packed_examples_equal_the_examples_alone(tiny):
  rng = np.random.default_rng(0)
  a_in, b_in, a_out, b_out = _ids(rng, 5), _ids(rng, 6), _ids(rng, 4), _ids(rng, 3)
  other_in, other_out = (b_in + 7) % 60 + 2, (b_out + 7) % 60 + 2

  def row(*parts, width):
    ids = np.concatenate(parts)
    seg = np.concatenate([np.full(len(p), i + 1) for i, p in enumerate(parts)])
    pos = np.concatenate([np.arange(len(p)) for p in parts])
    return [np.pad(x, (0, width - len(ids))) for x in (ids, seg, pos)]

  rows = [(row(a_in, b_in, width=LE), row(a_out, b_out, width=LD)),      # packed
          (row(a_in, width=LE), row(a_out, width=LD)),                    # each alone
          (row(b_in, width=LE), row(b_out, width=LD)),
          (row(a_in, other_in, width=LE), row(a_out, b_out, width=LD)),  # another second
          (row(a_in, b_in, width=LE), row(a_out, other_out, width=LD))]  # example
  rows += rows[:1] * (B - len(rows))
  enc, dec = ([np.stack([r[side][k] for r in rows]).astype(np.int32) for k in range(3)]
              for side in (0, 1))
  logits, _ = forward(tiny.module, tiny.params, enc[0], dec[0], enc[1], dec[1], enc[2], dec[2])
  packed = logits[0]
  np.testing.assert_allclose(packed[:4], logits[1, :4], atol=1e-5)
  np.testing.assert_allclose(packed[4:7], logits[2, :3], atol=1e-5)
  for other in logits[3:5]:  # the first example's logits are as they were
    np.testing.assert_allclose(other[:4], packed[:4], atol=1e-6)
    assert np.abs(other[4:7] - packed[4:7]).max() > 1e-3


def _batch(seed):
  rng = np.random.default_rng(seed)
  return _ids(rng, (B, LE)), _ids(rng, (B, LD))


def test_decoder_is_causal(tiny):
  enc, dec = _batch(1)
  base, _ = forward(tiny.module, tiny.params, enc, dec)
  changed, _ = forward(tiny.module, tiny.params, enc, dec.at[:, 5].set((dec[:, 5] + 1) % 64))
  np.testing.assert_allclose(changed[:, :5], base[:, :5], atol=1e-6)
  assert np.abs(changed[:, 5:] - base[:, 5:]).max(axis=(0, 2)).min() > 1e-4


def test_tied_and_untied_logits(tiny):
  enc, dec = _batch(2)
  logits, got = forward(tiny.module, tiny.params, enc, dec)
  np.testing.assert_allclose(logits, got['states'] @ np.asarray(tiny.params['lm_head']['kernel']),
                             rtol=1e-5, atol=1e-5)
  tied = t5.T5(t5.T5Config(**TINY, tie_embeddings=True))
  params = {k: v for k, v in tiny.params.items() if k != 'lm_head'}
  logits, got = forward(tied, params, enc, dec)
  table = np.asarray(tiny.params['token_embedder']['embedding'])
  np.testing.assert_allclose(logits, got['states'] @ table.T * 32 ** -0.5, rtol=1e-5, atol=1e-5)


def test_init_scales_are_t5s(tiny):
  params = pj.flatten(tiny.params)
  want = {'token_embedder/embedding': 1.0,
          'encoder/layer_0/attention/query/kernel': (32 * 8) ** -0.5,
          'decoder/layer_0/cross_attention/key/kernel': 32 ** -0.5,
          'encoder/layer_0/attention/output/kernel': 32 ** -0.5,
          'decoder/layer_0/mlp/wi_0/kernel': 32 ** -0.5, 'encoder/layer_0/mlp/wo/kernel':
          64 ** -0.5, 'lm_head/kernel': 32 ** -0.5}
  for path, std in want.items():
    assert abs(float(np.std(params[path])) / std - 1) < 0.15, path
  bias = np.concatenate([params[f'{s}/relative_bias/embedding'] for s in ('encoder', 'decoder')])
  assert abs(np.std(bias) / 32 ** -0.5 - 1) < 0.15
  assert np.all(np.asarray(params['decoder/final_norm/scale']) == 1)


# --- adapters, sharding, decoding -----------------------------------------------------------

LORA_TARGETS = ('attention/(query|key|value|output)/kernel', 'mlp/w(i_0|i_1|o)/kernel')


def _random_lora(model):
  adapter = pj.lora(LORA_TARGETS, rank=2, alpha=4.0)
  frozen, state = adapter.init(jax.random.key(1), model.params)
  keys = iter(jax.random.split(jax.random.key(2), 1000))
  return adapter, frozen, jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) / 8,
                                       state)


GEN_SEGMENTS = (np.arange(LE)[None] < np.array([[LE], [LE], [6], [2], [9], [1], [LE], [3]])
                ).astype(np.int32)


def test_lora_equals_the_merged_model(tiny):
  adapter, frozen, state = _random_lora(tiny)
  assert len(state) == 7 + 11  # q/k/v/o (+ cross) and three FFN kernels per layer
  enc, dec = _batch(3)
  seg = (np.array([[1] * LE] * 4 + [[1] * 5 + [2] * 7 + [0] * 2] * 4),
         np.array([[1] * LD] * 4 + [[1] * 3 + [2] * 4 + [0] * 2] * 4))
  structured, _ = forward(tiny.module, adapter.apply(frozen, state), enc, dec, *seg)
  merged_params = pj.merge(adapter, frozen, state)
  merged, _ = forward(tiny.module, merged_params, enc, dec, *seg)
  np.testing.assert_allclose(structured, merged, atol=1e-5, rtol=1e-5)
  base, _ = forward(tiny.module, tiny.params, enc, dec, *seg)
  assert np.abs(merged - base).max() > 1e-2


def test_every_param_is_sharded_by_its_logical_axes(tiny):
  mesh = make_mesh(2, 2, 2)
  specs = PS.param_specs(tiny.params, tiny.logical_axes, mesh)
  assert set(specs) == set(pj.flatten(tiny.params))
  for path, (spec, shape) in specs.items():
    assert len(spec) == len(shape), path
    if len(shape) == 2:  # every matrix is split over the mesh
      assert any(s is not None for s in spec), (path, spec)
  want = {'token_embedder/embedding': P('tensor', 'fsdp'),
          'encoder/relative_bias/embedding': P(None, 'tensor'),
          'decoder/layer_0/cross_attention/query/kernel': P('fsdp', 'tensor'),
          'encoder/layer_0/attention/output/kernel': P('tensor', 'fsdp'),
          'decoder/layer_0/mlp/wi_1/kernel': P('fsdp', 'tensor'),
          'encoder/layer_0/mlp/wo/kernel': P('tensor', 'fsdp'),
          'lm_head/kernel': P('fsdp', 'tensor'), 'decoder/final_norm/scale': P(None)}
  for path, spec in want.items():
    assert specs[path][0] == spec, path
  assert tiny.logical_axes('encoder/layer_0/mlp/wi/kernel') == ('embed', 'mlp')  # ReLU FFN
  with pytest.raises(ValueError, match="no logical axes for param 'decoder/pooler/kernel'"):
    tiny.logical_axes('decoder/pooler/kernel')
  # The sharded model computes what the unsharded one does.
  enc, dec = _batch(4)
  placed = jax.device_put(tiny.params, PS.shardings(tiny.params, specs, mesh))
  assert len(placed['lm_head']['kernel'].sharding.device_set) == 8
  rows = NamedSharding(mesh, P(('data', 'fsdp')))
  got, _ = forward(tiny.module, placed, jax.device_put(enc, rows), jax.device_put(dec, rows))
  want, _ = forward(tiny.module, tiny.params, enc, dec)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_cached_generation_equals_uncached_logits(tiny):
  # On a LoRA tree: the cached decoder computes structured leaves too.
  adapter, frozen, state = _random_lora(tiny)
  params = adapter.apply(frozen, state)
  enc, _ = _batch(5)
  tokens, logits = t5.generate(tiny.module, params, enc, encoder_segment_ids=GEN_SEGMENTS,
                               max_length=LD, eos_id=None, return_logits=True)
  inputs = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), tokens[:, :-1]], axis=1)
  full, _ = forward(tiny.module, params, enc, inputs, enc_seg=GEN_SEGMENTS)
  np.testing.assert_allclose(logits, full, atol=1e-5)
  np.testing.assert_array_equal(tokens, np.argmax(full, -1))
  assert len(set(np.asarray(tokens).ravel())) > 3  # not one repeated token


def test_overfits_a_reversal_batch(tiny):
  rng = np.random.default_rng(6)
  source = _ids(rng, (16, 8))
  target = source[:, ::-1]
  dec_in = jnp.concatenate([jnp.zeros((16, 1), jnp.int32), target[:, :-1]], axis=1)
  tx = optax.adam(1e-2)

  def loss_fn(params):
    logits = tiny.module.apply({'params': params}, source, dec_in)
    return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

  @jax.jit
  def steps(params, opt):
    def one(carry, _):
      params, opt = carry
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), opt), loss
    return jax.lax.scan(one, (params, opt), None, length=40)[1]

  losses = steps(tiny.params, tx.init(tiny.params))
  assert losses[-1] < 0.1 * losses[0], np.asarray(losses)


# --- builders and the encoder view ----------------------------------------------------------

def test_build_remat_dropout_and_the_preset(tiny):
  model = build(ml_collections.ConfigDict({'name': 't5', **TINY, 'remat': True}), seed=3)
  assert model.model_id == 't5-random-seed3' and model.module.remat
  assert jax.tree.structure(model.params) == jax.tree.structure(tiny.params)
  enc, dec = _batch(7)
  dropping = t5.T5(t5.T5Config(**{**TINY, 'dropout': 0.1}), remat=True)

  def loss(params):
    logits = dropping.apply({'params': params}, enc, dec, train=True,
                            rngs={'dropout': jax.random.key(0)})
    return jnp.mean(logits ** 2)

  jax.eval_shape(jax.grad(loss), tiny.params)  # remat's static `train` traces
  trained = jax.jit(lambda p: dropping.apply({'params': p}, enc, dec, train=True,
                                             rngs={'dropout': jax.random.key(0)}))(tiny.params)
  evaluated, _ = forward(tiny.module, tiny.params, enc, dec)
  assert np.isfinite(trained).all() and np.abs(trained - evaluated).max() > 1e-2
  ids = jnp.ones((1, 4), jnp.int32)
  for preset, count in ((t5.SMALL_CPU, 13_637_376), (t5.TINY_CPU, 4_459_520)):
    module = t5.T5(t5.T5Config(**{k: v for k, v in preset.items() if k != 'name'}))
    shapes = jax.eval_shape(module.init, jax.random.key(0), ids, ids)['params']
    assert sum(x.size for x in jax.tree.leaves(shapes)) == count


def test_encoder_view_runs_sentence_classification(tiny):
  model = t5.encoder_model(tiny)
  assert set(model.params) == {'token_embedder', 'encoder'}
  assert model.model_id == 't5-random-seed0/encoder'
  enc, dec = _batch(8)
  _, got = forward(tiny.module, tiny.params, enc, dec, enc_seg=GEN_SEGMENTS)
  labels = np.arange(B) % 3
  task = SentenceClassification(model, {'train': (np.asarray(enc), labels)})
  head = task.init_head(jax.random.key(0))
  assert head['kernel'].shape == (32, 3)
  batch = {'input_ids': enc, 'attention_mask': GEN_SEGMENTS, 'labels': labels,
           'weights': np.ones(B, np.float32)}
  np.testing.assert_allclose(jax.jit(task.logits)(model.params, head, batch),
                             mean_pool(got['encoded'], GEN_SEGMENTS) @ head['kernel']
                             + head['bias'], atol=1e-5)
  with pytest.raises(TypeError, match='expects a Model of T5'):
    t5.encoder_model(model)


def test_config_errors(tiny):
  with pytest.raises(ValueError, match="feed_forward 'gelu'; expected one of"):
    t5.T5Config(**{**TINY, 'feed_forward': 'gelu'})
  with pytest.raises(ValueError, match='relative_buckets 30: expected a multiple of 4'):
    t5.T5Config(**{**TINY, 'relative_buckets': 30})
  with pytest.raises(ValueError, match='cached decoding takes one token per row'):
    tiny.module.apply({'params': tiny.params}, jnp.zeros((1, 3, 32)),
                      jnp.ones((1, 2), jnp.int32), cache_length=4, method=t5.T5.decode,
                      mutable=['cache'])
