"""Side tuning (`peftjax.methods.side`, UniPT) against a hand-written reference of its
equations: no gradient reaches the backbone (its params, its embeddings' output) while every
side weight gets one; the side network reads the base model's features of the targeted
modules (not their inputs, not other blocks'); at init the output is the base output; BERT
with padding, the ViT, a user model of stock layers; file round trip; clear errors."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax as pj
from peftjax.core.adapter import inserted_modules
from peftjax.methods.side import SideOutput
from peftjax.models import vit
from peftjax.models.bert import Bert, BertConfig

WIDTH, SIZE = 16, 6
BERT = BertConfig(vocab_size=40, hidden_size=WIDTH, num_layers=2, num_heads=2,
                  intermediate_size=24, hidden_dropout=0.0, attention_dropout=0.0)
VIT = vit.ViTConfig(patch_size=7, hidden_size=WIDTH, num_layers=2, num_heads=2,
                    intermediate_size=32)
BLOCKS, ENCODER = r'encoder/layer_\d+$', 'encoder$'


@functools.lru_cache(maxsize=None)
def bert_params():
  ids = jnp.ones((1, 5), jnp.int32)
  return Bert(BERT).init(jax.random.key(0), ids, ids)['params']


def bert_inputs(seed):
  """Ids and a mask with padding at the end of the rows (the first row unpadded)."""
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, BERT.vocab_size, (3, 7)), jnp.int32)
  return ids, jnp.asarray(np.arange(7)[None] < np.array([[7], [5], [3]]), jnp.int32)


@jax.jit
def run_bert(params, ids, mask):
  return pj.apply(Bert(BERT), params, ids, mask)


@functools.lru_cache(maxsize=None)
def vit_model():
  return vit.init(VIT)


def images(seed):
  return jnp.asarray(np.random.default_rng(seed).random((3, 28, 28, 1)), jnp.float32)


@jax.jit
def run_vit(params, x):
  return pj.apply(vit.ViT(VIT), params, x)


def moved(state, seed=1, std=0.3):
  """The state moved in every leaf, as after training."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda l: l + jnp.asarray(std * rng.standard_normal(l.shape), l.dtype),
                      state)


def bert_side(**kwargs):
  adapter = pj.side(BLOCKS, ENCODER, SIZE, mask=1, **kwargs)
  frozen, state = adapter.init(jax.random.key(0), bert_params())
  return adapter, frozen, state


@jax.jit
def bert_features(ids, mask):
  """The base BERT's outputs of each block and of the encoder, by Flax's own capture."""
  _, found = Bert(BERT).apply({'params': bert_params()}, ids, mask,
                              capture_intermediates=True, mutable=['intermediates'])
  encoder = found['intermediates']['encoder']
  return ({f'encoder/layer_{i}': encoder[f'layer_{i}']['__call__'][0]
           for i in range(BERT.num_layers)}, encoder['__call__'][0])


def reference(state, taps, output, y, mask, fusion='residual'):
  """UniPT's side network, from the paper's equations (module docstring), in float64."""
  state = jax.tree.map(lambda v: np.asarray(v, np.float64), state)
  m = np.ones(y.shape[:-1]) if mask is None else np.asarray(mask, np.float64)

  def norm(u, scale, bias):
    u = (u - u.mean(-1, keepdims=True)) / np.sqrt(u.var(-1, keepdims=True) + 1e-5)
    return u * scale + bias

  def project(e, h):
    return norm(np.asarray(h, np.float64) @ e['down'] + e['down_bias'], e['norm_scale'],
                e['norm_bias'])

  pool = lambda u: (u * m[..., None]).sum(-2) / m.sum(-1, keepdims=True)
  o = state[output]
  a = project(o, y)
  merged, confidence = [], []
  for path, h in taps.items():
    t = project(state[path], h)
    w = np.maximum(a @ np.swapaxes(t, -1, -2) * m[..., None, :], 0)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-6) + np.eye(t.shape[-2])
    merged.append(w @ t)
    confidence.append((pool(a) * pool(t)) @ o['gate'] + o['gate_bias'])
  c = np.concatenate(confidence, -1)
  p = np.exp(c - c.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  u = sum(p[..., i, None, None] * merged[i] for i in range(len(merged)))
  z = a + norm(u @ o['proj'] + o['proj_bias'], o['proj_norm_scale'], o['proj_norm_bias'])
  s = np.maximum(z, 0) @ o['up'] + o['up_bias']
  return np.asarray(y, np.float64) + s if fusion == 'residual' else s


@pytest.mark.parametrize('fusion', ['residual', 'replace'])
def test_bert_output_is_the_side_network_over_the_base_model_s_block_outputs(fusion):
  adapter, frozen, state = bert_side(fusion=fusion)
  state = moved(state)
  ids, mask = bert_inputs(2)
  hidden, y = bert_features(ids, mask)
  got = run_bert(adapter.apply(frozen, state), ids, mask)
  want = reference(state, hidden, 'encoder', y, mask, fusion)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  # Reading another block, a block's input, or the padding changes the output.
  wrong = dict(hidden, **{'encoder/layer_1': hidden['encoder/layer_0']})
  assert np.abs(reference(state, wrong, 'encoder', y, mask, fusion) - want).max() > 1e-3
  assert np.abs(reference(state, hidden, 'encoder', y, None, fusion) - want)[0].max() < 1e-9
  assert np.abs(reference(state, hidden, 'encoder', y, None, fusion) - want)[1:].max() > 1e-3


def test_only_the_targeted_blocks_are_read():
  adapter = pj.side('encoder/layer_1$', ENCODER, SIZE, mask=1)
  frozen, state = adapter.init(jax.random.key(3), bert_params())
  assert set(state) == {'encoder/layer_1', 'encoder'}
  state = moved(state)
  ids, mask = bert_inputs(5)
  hidden, y = bert_features(ids, mask)
  np.testing.assert_allclose(
      run_bert(adapter.apply(frozen, state), ids, mask),
      reference(state, {'encoder/layer_1': hidden['encoder/layer_1']}, 'encoder', y, mask),
      rtol=2e-5, atol=2e-5)
  assert sorted(inserted_modules(adapter.apply(frozen, state))) == ['encoder', 'encoder/layer_1']


@pytest.mark.parametrize('fusion', ['residual', 'replace'])
def test_no_gradient_flows_through_the_backbone_while_every_side_weight_gets_one(fusion):
  adapter, frozen, state = bert_side(fusion=fusion, init='uniform')
  state = moved(state)
  ids, mask = bert_inputs(3)
  target = jnp.asarray(np.random.default_rng(0).standard_normal((3, 7, WIDTH)), jnp.float32)

  def loss(state, frozen, shift):
    """The squared error of the outputs with `shift` added to the embeddings' output."""
    params = adapter.apply(frozen, state)
    shifted = {**params, 'embeddings': {**params['embeddings'],
                                        'norm': {**params['embeddings']['norm'],
                                                 'bias': params['embeddings']['norm']['bias']
                                                 + shift}}}
    return jnp.sum(mask[..., None] * (run_bert(shifted, ids, mask) - target) ** 2)

  shift = jnp.zeros((WIDTH,))
  g_state, g_frozen, g_shift = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(state, frozen, shift)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_frozen))
  assert float(jnp.abs(g_shift).max()) == 0  # nothing reaches the embeddings' output
  assert set(pj.flatten(g_state)) == set(pj.flatten(state))
  for path, g in pj.flatten(g_state).items():
    assert float(jnp.abs(g).max()) > 0, path
  # The same loss through the base model does reach both.
  base = lambda frozen: jnp.sum(mask[..., None] * (run_bert(frozen, ids, mask) - target) ** 2)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(jax.grad(base)(frozen))) > 0


def test_zero_up_leaves_outputs_unchanged_at_init_and_replace_does_not():
  ids, mask = bert_inputs(1)
  adapter, frozen, state = bert_side()
  assert frozen is bert_params()
  np.testing.assert_array_equal(run_bert(adapter.apply(frozen, state), ids, mask),
                                run_bert(bert_params(), ids, mask))
  adapter, frozen, state = bert_side(fusion='replace')
  base = run_bert(bert_params(), ids, mask)
  assert float(jnp.abs(run_bert(adapter.apply(frozen, state), ids, mask) - base).max()) > 0.1
  adapter, frozen, state = bert_side(init='uniform')
  assert float(jnp.abs(run_bert(adapter.apply(frozen, state), ids, mask) - base).max()) > 1e-3


def test_vit_the_encoder_s_normed_tokens_are_the_anchor_and_pooling_reads_the_fused_tokens():
  params, x = vit_model().params, images(0)
  adapter = pj.side(BLOCKS, ENCODER, SIZE)
  frozen, state = adapter.init(jax.random.key(2), params)
  # y + 0: the same values, which XLA may round differently in another fusion.
  np.testing.assert_allclose(run_vit(adapter.apply(frozen, state), x), run_vit(params, x),
                             rtol=1e-6, atol=1e-6)
  state = moved(state)
  capture = jax.jit(lambda x: vit.ViT(VIT).apply({'params': params}, x,
                                                 capture_intermediates=True,
                                                 mutable=['intermediates']))
  _, found = capture(x)
  encoder = found['intermediates']['encoder']
  hidden = {f'encoder/layer_{i}': encoder[f'layer_{i}']['__call__'][0] for i in range(2)}
  want = reference(state, hidden, 'encoder', encoder['__call__'][0], None).mean(1)
  np.testing.assert_allclose(run_vit(adapter.apply(frozen, state), x), want, rtol=2e-5,
                             atol=2e-5)


class UserModel(nn.Module):
  """Stock layers: an embedding Dense, two residual MLP blocks, a final norm, a head."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, name='embed')(x)
    for i in range(2):
      h = h + nn.Dense(8, name=f'block_{i}')(nn.gelu(h))
    return nn.Dense(3, name='head')(nn.LayerNorm(name='final')(h))


@functools.lru_cache(maxsize=None)
def user_params():
  return UserModel().init(jax.random.key(0), jnp.zeros((1, 4, 5)))['params']


def test_a_user_model_of_stock_layers_taps_modules_that_run_before_the_output():
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4, 5)), jnp.float32)
  run = jax.jit(lambda p: pj.apply(UserModel(), p, x))
  # The norm has no kernel: its width is given. The blocks' come from their kernels.
  adapter = pj.side([r'^block_\d$', '^embed$'], '^final$', 4, widths={'final$': 8})
  frozen, state = adapter.init(jax.random.key(0), user_params())
  np.testing.assert_array_equal(run(adapter.apply(frozen, state)), run(user_params()))
  state = moved(state)
  p = user_params()
  dense = lambda q, v: v @ q['kernel'] + q['bias']
  taps = {'embed': dense(p['embed'], x)}
  taps['block_0'] = dense(p['block_0'], nn.gelu(taps['embed']))
  taps['block_1'] = dense(p['block_1'], nn.gelu(taps['embed'] + taps['block_0']))
  y = nn.LayerNorm().apply({'params': p['final']}, sum(taps.values()))
  fused = reference(state, dict(sorted(taps.items())), 'final', y, None)
  np.testing.assert_allclose(run(adapter.apply(frozen, state)),
                             dense(p['head'], jnp.asarray(fused, jnp.float32)), rtol=2e-5,
                             atol=2e-5)
  # Without the interceptor Linen ignores the inserted modules: the base model runs.
  np.testing.assert_array_equal(UserModel().apply({'params': adapter.apply(frozen, state)}, x),
                                UserModel().apply({'params': p}, x))


def test_adapter_file_round_trip(tmp_path):
  adapter, frozen, state = bert_side(fusion='replace', init='uniform')
  state = moved(state)
  pj.save_adapter(tmp_path, adapter, frozen, state, base_model='tiny-bert')
  loaded, frozen2, state2, _, meta = pj.load_adapter(tmp_path, bert_params())
  assert loaded.config == adapter.config == meta['method']
  jax.tree.map(np.testing.assert_array_equal, state2, state)
  ids, mask = bert_inputs(6)
  np.testing.assert_array_equal(run_bert(loaded.apply(frozen2, state2), ids, mask),
                                run_bert(adapter.apply(frozen, state), ids, mask))
  with pytest.raises(pj.NotMergeableError, match="'side' inserts modules"):
    pj.merge(loaded, frozen2, state2)


def test_clear_errors():
  params, x = vit_model().params, images(0)
  ids, mask = bert_inputs(0)
  with pytest.raises(ValueError, match=r"output='encoder' should name one module; it names "
                                       r"\['encoder', 'encoder/layer_0'"):
    pj.side(BLOCKS, 'encoder').init(jax.random.key(0), params)
  with pytest.raises(ValueError, match=r"targets \['encoder'\] are \(or hold\) the output"):
    pj.side(ENCODER, 'encoder/layer_1$').init(jax.random.key(0), params)
  with pytest.raises(ValueError, match='output width of module encoder/norm/x'):
    pj.side('layer_0$', 'norm/x$').init(jax.random.key(0), {'encoder': {
        'layer_0': params['encoder']['layer_0'], 'norm': {'x': {'scale': jnp.ones(3)}}}})
  with pytest.raises(pj.PatternError, match='no_such_block'):
    pj.side('no_such_block', ENCODER).init(jax.random.key(0), params)
  with pytest.raises(ValueError, match="fusion 'sum'; expected one of"):
    pj.side(BLOCKS, ENCODER, fusion='sum')
  with pytest.raises(ValueError, match='size must be a positive int'):
    pj.side(BLOCKS, ENCODER, 0)
  # BERT's encoder takes a mask that the side network must be told of.
  adapter = pj.side(BLOCKS, ENCODER, SIZE)
  frozen, state = adapter.init(jax.random.key(0), bert_params())
  with pytest.raises(ValueError, match=r'shape \(3, 7\) \(at 1\).*mask='):
    run_bert(adapter.apply(frozen, state), ids, mask)
  # A wrong width names the module and the option that fixes it.
  adapter = pj.side(BLOCKS, ENCODER, SIZE, widths={'layer_1$': 12})
  frozen, state = adapter.init(jax.random.key(0), params)
  with pytest.raises(ValueError, match=r'^encoder/layer_1: the side network reads its output '
                                       r'of width 12.*widths='):
    run_vit(adapter.apply(frozen, state), x)
  # Taps that run after the output module returns, or inside a lifted transform (remat).
  adapter = pj.side('^head$', '^final$', 4, widths={'final$': 8})
  frozen, state = adapter.init(jax.random.key(0), user_params())
  with pytest.raises(ValueError, match=r'^final: the side network reads head, which did not '
                                       r'run before this module returned'):
    pj.apply(UserModel(), adapter.apply(frozen, state), jnp.ones((2, 4, 5)))
  remat = vit.init(VIT, remat=True)
  adapter = pj.side(BLOCKS, ENCODER, SIZE)
  frozen, state = adapter.init(jax.random.key(0), remat.params)
  with pytest.raises(ValueError, match=r'encoder/layer_0, encoder/layer_1, which did not run.*'
                                       r'nn.remat'):
    pj.apply(remat.module, adapter.apply(frozen, state), x)


def test_a_side_output_reads_tokens_of_its_own_shape():
  adapter = pj.side('embeddings/patch$', ENCODER, SIZE)
  frozen, state = adapter.init(jax.random.key(0), vit_model().params)
  leaf = adapter.apply(frozen, state)['encoder']['side']
  assert isinstance(leaf, SideOutput) and leaf.taps == ('embeddings/patch',)
  y = jnp.ones((2, 16, WIDTH))
  with pytest.raises(ValueError, match='reads and adds to an output of width 16'):
    leaf(jnp.ones((2, 16, 5)), [jnp.ones((2, 16, SIZE))])
  assert leaf(y, [jnp.ones((2, 16, SIZE))]).shape == y.shape
