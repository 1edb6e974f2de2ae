"""VPT and DVPT (`peftjax.methods.prompts`) against hand-written references: prompts of length
0 change nothing; shallow and deep prompts on the tiny ViT (mean and class-token pooling) and
on BERT's masked layers; prepended, not appended, on a causal model of stock layers; only the
prompts train; DVPT's shared module is one copy whose gradient sums every block's."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax as pj
from peftjax.core.adapter import inserted_modules
from peftjax.models import vit
from peftjax.models.bert import Bert, BertConfig
from peftjax.models.bert import Layer as BertLayer

WIDTH = 16
VIT = dict(patch_size=7, hidden_size=WIDTH, num_layers=2, num_heads=2, intermediate_size=32)
BERT = BertConfig(vocab_size=40, hidden_size=WIDTH, num_layers=2, num_heads=2,
                  intermediate_size=24, hidden_dropout=0.0, attention_dropout=0.0)
DEEP, SHALLOW = r'encoder/layer_\d+$', 'encoder$'
PATCH = 'embeddings/patch/kernel$'


@functools.lru_cache(maxsize=None)
def vit_model(pool='mean'):
  return vit.init(vit.ViTConfig(**VIT, pool=pool))


def images(seed):
  return jnp.asarray(np.random.default_rng(seed).random((3, 28, 28, 1)), jnp.float32)


@functools.lru_cache(maxsize=None)
def bert_params():
  ids = jnp.ones((1, 5), jnp.int32)
  return Bert(BERT).init(jax.random.key(0), ids, ids)['params']


def bert_inputs(seed):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, BERT.vocab_size, (3, 7)), jnp.int32)
  return ids, jnp.asarray(rng.random((3, 7)) > 0.3, jnp.int32).at[:, 0].set(1)


@functools.partial(jax.jit, static_argnames='pool')
def run_vit(params, x, pool='mean'):
  return pj.apply(vit.ViT(vit.ViTConfig(**VIT, pool=pool)), params, x)


@jax.jit
def run_bert(params, ids, mask):
  return pj.apply(Bert(BERT), params, ids, mask)


def moved(state, seed=1, std=0.3):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda l: l + jnp.asarray(std * rng.standard_normal(l.shape), l.dtype),
                      state)


def test_prompts_of_length_zero_leave_outputs_unchanged_exactly():
  x = images(0)
  ids, mask = bert_inputs(0)
  for make, targets in ((pj.vpt, DEEP), (pj.vpt, SHALLOW),
                        (functools.partial(pj.dvpt, size=3, shared=True), DEEP)):
    adapter = make(targets, 0, width=WIDTH)
    frozen, state = adapter.init(jax.random.key(0), vit_model().params)
    np.testing.assert_array_equal(run_vit(adapter.apply(frozen, moved(state)), x),
                                  run_vit(vit_model().params, x))
    adapter = make(targets, 0, width=WIDTH, mask=1)  # BERT's layers take a mask
    frozen, state = adapter.init(jax.random.key(0), bert_params())
    np.testing.assert_array_equal(run_bert(adapter.apply(frozen, moved(state)), ids, mask),
                                  run_bert(bert_params(), ids, mask))


def vit_reference(params, prompts, x, *, deep, pool):
  """VPT's Eqs. 1-2 on the ViT, by hand: shallow, [x; P] through every block; deep, each
  block's prompts replace the previous block's prompt outputs; pooled over the image tokens
  (mean) or the class token, never over prompts."""
  cfg = vit_model(pool).module.config
  h = vit.Embeddings(cfg).apply({'params': params['embeddings']}, x)
  layers = [params['encoder'][f'layer_{i}'] for i in range(cfg.num_layers)]
  n = prompts[0].shape[0]
  with_prompts = lambda p, h: jnp.concatenate([jnp.broadcast_to(p, (h.shape[0], *p.shape)), h], 1)
  if not deep:
    h = with_prompts(prompts[0], h)
  for i, layer in enumerate(layers):
    if deep:
      h = with_prompts(prompts[i], h)
    h = vit.Block(cfg).apply({'params': layer}, h)
    if deep:
      h = h[:, n:]
  h = nn.LayerNorm(epsilon=cfg.layer_norm_eps).apply({'params': params['encoder']['norm']}, h)
  if not deep:
    h = h[:, n:]
  return h[:, 0] if pool == 'cls' else jnp.mean(h, axis=1)


@pytest.mark.parametrize('pool', ['mean', 'cls'])
def test_vpt_shallow_and_deep_compute_the_papers_equations_on_the_vit(pool):
  params = vit_model(pool).params
  x = images(3)  # fresh inputs
  outs = {}
  for name, targets in (('deep', DEEP), ('shallow', SHALLOW)):
    adapter = pj.vpt(targets, 4, width=WIDTH, fan_in=PATCH)
    frozen, state = adapter.init(jax.random.key(1), params)
    prompts = [e['tokens'] for e in state.values()]
    assert len(prompts) == (2 if name == 'deep' else 1)
    outs[name] = run_vit(adapter.apply(frozen, state), x, pool)
    want = vit_reference(params, prompts, x, deep=name == 'deep', pool=pool)
    np.testing.assert_allclose(outs[name], want, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(outs[name] - run_vit(params, x, pool)).max()) > 1e-3
  # Deep prompts used as shallow ones (the first block's only) compute something else.
  adapter = pj.vpt(DEEP, 4, width=WIDTH, fan_in=PATCH)
  frozen, state = adapter.init(jax.random.key(1), params)
  first_only = vit_reference(params, [state['encoder/layer_0']['tokens']], x, deep=False,
                             pool=pool)
  assert float(jnp.abs(outs['deep'] - first_only).max()) > 1e-4


def test_vpt_init_is_the_official_xavier_bound_over_the_patch_projection():
  _, state = pj.vpt(DEEP, 50, width=WIDTH, fan_in=PATCH).init(jax.random.key(0),
                                                              vit_model().params)
  bound = np.sqrt(6.0 / (7 * 7 * 1 + WIDTH))  # patch 7, one channel: fan_in 49
  tokens = np.concatenate([e['tokens'] for e in state.values()])
  assert np.abs(tokens).max() <= bound and np.abs(tokens).max() > 0.95 * bound
  assert not np.array_equal(state['encoder/layer_0']['tokens'],
                            state['encoder/layer_1']['tokens'])  # a fresh set per block


def test_prompts_extend_bert_s_attention_mask_in_front():
  """Deep prompts on BERT's layers, by hand: each layer sees [P; x] under the mask [1..1; m]
  (padding stays masked, prompts are attended); outputs keep their length."""
  params = bert_params()
  ids, mask = bert_inputs(5)
  adapter = pj.vpt(DEEP, 3, width=WIDTH, mask=1)
  frozen, state = adapter.init(jax.random.key(2), params)
  got = run_bert(adapter.apply(frozen, state), ids, mask)
  from peftjax.models.bert import Embeddings  # pylint: disable=g-import-not-at-top
  h = Embeddings(BERT).apply({'params': params['embeddings']}, ids, jnp.zeros_like(ids))
  ones = jnp.ones((3, 3), mask.dtype)
  for i in range(BERT.num_layers):
    p = jnp.broadcast_to(state[f'encoder/layer_{i}']['tokens'], (3, 3, WIDTH))
    h = BertLayer(BERT).apply({'params': params['encoder'][f'layer_{i}']},
                              jnp.concatenate([p, h], 1), jnp.concatenate([ones, mask], 1))[:, 3:]
  assert got.shape == (3, 7, WIDTH)
  np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-5)


class CausalMix(nn.Module):
  """Each token becomes the mean of the tokens up to it, then a Dense: order matters."""

  @nn.compact
  def __call__(self, x):
    mean = jnp.cumsum(x, axis=-2) / jnp.arange(1, x.shape[-2] + 1)[:, None]
    return nn.Dense(x.shape[-1], name='dense')(mean)


class UserModel(nn.Module):
  """Stock layers: tokens [B, L, 6] -> embed -> a causal block -> per-token head."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, name='embed')(x)
    return nn.Dense(3, name='head')(h + CausalMix(name='block')(h))


@functools.lru_cache(maxsize=None)
def user_params():
  return UserModel().init(jax.random.key(0), jnp.zeros((1, 4, 6)))['params']


def test_prompts_are_prepended_on_a_model_of_stock_layers():
  x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 5, 6)), jnp.float32)
  adapter = pj.vpt('block$', 2, width=8)
  frozen, state = adapter.init(jax.random.key(0), user_params())
  got = pj.apply(UserModel(), adapter.apply(frozen, state), x)
  params, p = user_params(), state['block']['tokens']
  dense = lambda q, v: v @ q['kernel'] + q['bias']
  h = dense(params['embed'], x)
  seq = jnp.concatenate([jnp.broadcast_to(p, (2, *p.shape)), h], 1)
  mixed = dense(params['block']['dense'],
                jnp.cumsum(seq, 1) / jnp.arange(1, seq.shape[1] + 1)[:, None])[:, 2:]
  np.testing.assert_allclose(got, dense(params['head'], h + mixed), rtol=1e-5, atol=1e-5)
  # Appended prompts would leave a causal block's token outputs unchanged; these do not.
  assert float(jnp.abs(got - pj.apply(UserModel(), params, x)).max()) > 1e-3


def test_gradients_reach_only_the_prompts_and_the_head():
  params = vit_model().params
  adapter = pj.vpt(DEEP, 3, width=WIDTH, fan_in=PATCH)
  frozen, state = adapter.init(jax.random.key(0), params)
  head = {'kernel': jnp.ones((WIDTH, 4)) * 0.1, 'bias': jnp.zeros((4,))}
  x = images(9)

  def loss(trainable, frozen):
    s, h = trainable
    return jnp.sum((run_vit(adapter.apply(frozen, s), x) @ h['kernel'] + h['bias']) ** 2)

  grads = jax.grad(loss)((state, head), frozen)
  assert set(pj.flatten(grads[0])) == {f'encoder/layer_{i}/tokens' for i in range(2)}
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  assert not set(pj.flatten(state)) & set(pj.flatten(params))
  frozen_grads = jax.grad(loss, argnums=1)((state, head), frozen)  # what training leaves
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(frozen_grads))
  assert inserted_modules(adapter.apply(frozen, state)) == ['encoder/layer_0', 'encoder/layer_1']
  with pytest.raises(pj.NotMergeableError, match="'vpt' inserts modules"):
    pj.merge(adapter, frozen, state)


def dvpt_prompts(e, x):
  """DVPT's prompts for block input x, by hand: queries attend over the bottleneck."""
  h = jax.nn.gelu(x @ e['down'] + e['down_bias'], approximate=False)
  a = jax.nn.softmax(jnp.einsum('pr,blr->bpl', e['tokens'], h) / np.sqrt(h.shape[-1]), -1)
  return (a @ h) @ e['up'] + e['up_bias']


def test_dvpt_prompts_come_from_the_queries_attending_over_each_block_s_tokens():
  params = vit_model().params
  adapter = pj.dvpt(DEEP, 3, 5, width=WIDTH)
  frozen, state = adapter.init(jax.random.key(0), params)
  assert float(jnp.abs(state['encoder/layer_0']['up']).max()) == 0  # zero prompts at init
  state = moved(state)
  x = images(4)
  cfg = vit_model().module.config
  h = vit.Embeddings(cfg).apply({'params': params['embeddings']}, x)
  for i in range(cfg.num_layers):
    p = dvpt_prompts(state[f'encoder/layer_{i}'], h)
    h = vit.Block(cfg).apply({'params': params['encoder'][f'layer_{i}']},
                             jnp.concatenate([p, h], 1))[:, 3:]
  h = nn.LayerNorm(epsilon=cfg.layer_norm_eps).apply({'params': params['encoder']['norm']}, h)
  np.testing.assert_allclose(run_vit(adapter.apply(frozen, state), x), h.mean(1), rtol=1e-5,
                             atol=1e-5)


def test_shared_dvpt_is_one_module_whose_gradient_sums_every_block_s():
  params = vit_model().params
  shared = pj.dvpt(DEEP, 3, 5, shared=True, width=WIDTH)
  frozen, state = shared.init(jax.random.key(0), params)
  assert list(state) == ['shared']
  state = moved(state)
  per_block = pj.dvpt(DEEP, 3, 5, width=WIDTH)  # the same weights, one copy per block
  copies = {f'encoder/layer_{i}': state['shared'] for i in range(2)}
  x = images(6)
  loss = lambda a, s: jnp.sum(run_vit(a.apply(frozen, s), x) ** 2)
  np.testing.assert_allclose(loss(shared, state), loss(per_block, copies), rtol=1e-6)
  g_shared = jax.grad(functools.partial(loss, shared))(state)['shared']
  g_copies = jax.grad(functools.partial(loss, per_block))(copies)
  for name, g in g_shared.items():
    parts = [g_copies[f'encoder/layer_{i}'][name] for i in range(2)]
    assert all(float(jnp.abs(q).max()) > 0 for q in parts), name
    np.testing.assert_allclose(g, parts[0] + parts[1], rtol=1e-4, atol=1e-7)
  assert pj.num_params(state) == pj.num_params(copies) // 2


@pytest.mark.parametrize('config', [
    {'method': 'vpt', 'targets': [DEEP], 'length': 3, 'width': WIDTH, 'fan_in': PATCH,
     'dropout': 0.1},
    {'method': 'dvpt', 'targets': [DEEP], 'length': 2, 'size': 4, 'shared': True,
     'width': WIDTH}])
def test_adapter_file_round_trip(config, tmp_path):
  adapter = pj.from_config(config)
  frozen, state = adapter.init(jax.random.key(0), vit_model().params)
  state = moved(state)
  pj.save_adapter(tmp_path, adapter, frozen, state, base_model='tiny-vit')
  loaded, frozen2, state2, _, meta = pj.load_adapter(tmp_path, vit_model().params)
  assert loaded.config == adapter.config == meta['method']
  jax.tree.map(np.testing.assert_array_equal, state2, state)
  x = images(8)
  np.testing.assert_array_equal(run_vit(loaded.apply(frozen2, state2), x),
                                run_vit(adapter.apply(frozen, state), x))


def test_prompt_dropout_is_active_in_training_only():
  adapter = pj.vpt(DEEP, 3, width=WIDTH, dropout=0.5)
  frozen, state = adapter.init(jax.random.key(0), vit_model().params)
  params, x, module = adapter.apply(frozen, state), images(1), vit_model().module
  train = lambda k: pj.apply(module, params, x, train=True, rng=jax.random.key(k))
  np.testing.assert_array_equal(train(0), train(0))
  assert float(jnp.abs(train(0) - train(1)).max()) > 1e-4
  no_drop = pj.vpt(DEEP, 3, width=WIDTH).apply(frozen, state)
  np.testing.assert_array_equal(run_vit(params, x), run_vit(no_drop, x))


def test_clear_errors():
  params, x = vit_model().params, images(0)
  bad = pj.vpt('embeddings$', 2, width=WIDTH)  # called with images, not tokens
  frozen, state = bad.init(jax.random.key(0), params)
  with pytest.raises(ValueError, match=r'^embeddings: prompts of width 16 go before tokens'):
    run_vit(bad.apply(frozen, state), x)
  pooling = pj.vpt('^$', 2, width=6)  # the whole user model: tokens in, but not out
  with pytest.raises(ValueError, match="(?s)no module|matches no module"):
    pooling.init(jax.random.key(0), user_params())

  class Pool(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name='head')(Pooler(name='pool')(x))

  class Pooler(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(6, name='dense')(x).mean(-2)

  p = Pool().init(jax.random.key(0), jnp.zeros((1, 4, 6)))['params']
  a = pj.vpt('^pool$', 2, width=6)
  frozen, state = a.init(jax.random.key(0), p)
  with pytest.raises(ValueError, match=r"^pool: a prompted block maps tokens"):
    pj.apply(Pool(), a.apply(frozen, state), jnp.ones((2, 4, 6)))
  ids, mask = bert_inputs(0)
  a = pj.vpt(DEEP, 2, width=WIDTH)  # BERT's mask left unnamed
  frozen, state = a.init(jax.random.key(0), bert_params())
  with pytest.raises(ValueError, match=r'shape \(3, 7\) \(at 1\).*mask='):
    run_bert(a.apply(frozen, state), ids, mask)
  a = pj.vpt(DEEP, 2, width=WIDTH, mask=2)
  frozen, state = a.init(jax.random.key(0), bert_params())
  with pytest.raises(ValueError, match='one entry per token'):  # arg 2 is `train`
    run_bert(a.apply(frozen, state), ids, mask)
  _, state = pj.vpt(DEEP, 2).init(jax.random.key(0), params)  # the width of the query's input
  assert state['encoder/layer_0']['tokens'].shape == (2, WIDTH)
  with pytest.raises(ValueError, match=r'token width of block encoder/norm.*width='):
    pj.vpt('encoder/norm$', 2).init(jax.random.key(0), params)
  with pytest.raises(ValueError, match='should name one 2-D kernel'):
    pj.vpt(DEEP, 2, width=WIDTH, fan_in='norm/scale$').init(jax.random.key(0), params)
  with pytest.raises(ValueError, match='length must be an int >= 0'):
    pj.vpt(DEEP, -1)
