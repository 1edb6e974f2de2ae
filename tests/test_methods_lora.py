"""LoRA and rsLoRA on a tiny random BERT: HF PEFT's invariants on fresh random inputs (what
every method promises is in test_methods_contract)."""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax as pj
from peftjax.core import paths as P
from peftjax.core.adapter import describe_targets
from peftjax.models.bert import Bert, BertConfig, mean_pool

CFG = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                 intermediate_size=64)
QUIET = dataclasses.replace(CFG, hidden_dropout=0.0, attention_dropout=0.0)
TARGETS = ['attention/(query|value)/kernel', 'intermediate/kernel']


@functools.lru_cache(maxsize=None)
def setup(seed):
  """A randomly initialised tiny BERT's params and a random padded batch."""
  k_init, k_ids, k_len = jax.random.split(jax.random.key(seed), 3)
  ids = jax.random.randint(k_ids, (3, 7), 1, CFG.vocab_size)
  lengths = jax.random.randint(k_len, (3, 1), 2, 8)
  mask = (jnp.arange(7)[None] < lengths).astype(jnp.int32)
  params = Bert(CFG).init(k_init, ids, mask)['params']
  return params, ids, mask


def run(params, ids, mask, **kwargs):
  return Bert(QUIET if kwargs.get('train') else CFG).apply({'params': params}, ids, mask, **kwargs)


def randomize(state, seed, std=0.1):
  """Non-zero A and B everywhere, so that the adapter changes the model."""
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [std * jax.random.normal(k, l.shape)
                                      for k, l in zip(keys, leaves)])


def by_hand(params, state, scales):
  """The params with W + s * A @ B written out for every adapted kernel."""
  flat = P.flatten(params)
  for path, ab in state.items():
    flat[path] = flat[path] + scales[path] * (ab['a'] @ ab['b'])
  return P.unflatten(flat)


def kernel_paths(params):
  return [p for p, v in P.flatten(params).items() if v.ndim == 2]


def test_trainable_count_ranks_and_scales_follow_the_patterns():
  params, _, _ = setup(6)
  adapter = pj.lora(TARGETS, rank=4, alpha=8, rank_pattern={'layer_1/.*query': 2, 'value': 3},
                    alpha_pattern={'intermediate': 3.0})
  frozen, state = adapter.init(jax.random.key(6), params)
  flat = P.flatten(params)
  info = describe_targets(adapter, frozen, state)
  assert sorted(state) == sorted(P.select(kernel_paths(params), TARGETS))
  expected, scales = 0, {}
  for path in state:
    d_in, d_out = flat[path].shape
    r = 2 if 'layer_1/attention/query' in path else 3 if 'value' in path else 4
    alpha = 3.0 if 'intermediate' in path else 8
    expected += r * (d_in + d_out)
    scales[path] = alpha / r
    assert state[path]['a'].shape == (d_in, r) and state[path]['b'].shape == (r, d_out)
    assert info[path] == {'shape': [d_in, d_out], 'trainable': r * (d_in + d_out), 'rank': r,
                          'scale': pytest.approx(alpha / r)}
  assert pj.num_params(state) == expected
  state = randomize(state, 6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               pj.merge(adapter, frozen, state), by_hand(params, state, scales))


@pytest.mark.parametrize('rank', [1, 4, 16])
def test_scaling_lora_and_rslora_through_the_weight_delta(rank):
  w = jax.random.normal(jax.random.key(rank), (16, 24))
  params = {'dense': {'kernel': w}, 'other': {'kernel': w[:, :8]}}
  cases = ((pj.lora('dense', rank=rank, alpha=8), 8 / rank),
           (pj.lora('dense', rank=rank, alpha=8, rslora=True), 8 / math.sqrt(rank)),
           (pj.rslora('dense', rank=rank, alpha=8), 8 / math.sqrt(rank)),
           (pj.rslora('kernel', rank=2, alpha=8, rank_pattern={'dense': rank}),
            8 / math.sqrt(rank)))
  for adapter, scale in cases:
    frozen, state = adapter.init(jax.random.key(0), params)
    state = randomize(state, rank)
    ab = state['dense/kernel']
    merged = pj.merge(adapter, frozen, state)
    delta = merged['dense']['kernel'] - w
    np.testing.assert_allclose(delta, scale * (ab['a'] @ ab['b']), rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(delta).max()) > 1e-3
    if 'other/kernel' in state:
      ab = state['other/kernel']
      np.testing.assert_allclose(merged['other']['kernel'] - w[:, :8],
                                 8 / math.sqrt(2) * (ab['a'] @ ab['b']), rtol=1e-4, atol=1e-6)
  assert pj.rslora('dense').config == pj.lora('dense', rslora=True).config


def test_training_changes_only_the_adapter_and_head():
  params, ids, mask = setup(7)
  adapter = pj.lora(TARGETS, rank=4, alpha=8)
  frozen, state = adapter.init(jax.random.key(7), params)
  before = jax.tree.map(np.array, frozen)
  head = {'kernel': 0.1 * jax.random.normal(jax.random.key(77), (CFG.hidden_size, 2)),
          'bias': jnp.zeros(2)}
  labels = jnp.array([0, 1, 1])
  trainable = {'lora': state, 'head': head}
  start = jax.tree.map(np.array, trainable)
  tx = optax.adamw(1e-2)

  def loss_fn(t, frozen):
    h = run(adapter.apply(frozen, t['lora']), ids, mask)
    logits = mean_pool(h, mask) @ t['head']['kernel'] + t['head']['bias']
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(t, opt, frozen):
    loss, grads = jax.value_and_grad(loss_fn)(t, frozen)
    updates, opt = tx.update(grads, opt, t)
    return optax.apply_updates(t, updates), opt, loss, grads

  opt, losses = tx.init(trainable), []
  for _ in range(4):
    trainable, opt, loss, grads = step(trainable, opt, frozen)
    losses.append(float(loss))
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  assert losses[-1] < losses[0]
  jax.tree.map(np.testing.assert_array_equal, frozen, before)
  jax.tree.map(np.testing.assert_array_equal, frozen, params)
  for path in state:
    ab, ab0 = trainable['lora'][path], start['lora'][path]
    assert float(jnp.abs(ab['b']).min()) > 0 and float(jnp.abs(grads['lora'][path]['a']).max()) > 0
    assert float(jnp.abs(ab['a'] - ab0['a']).max()) > 1e-4
  assert not np.array_equal(trainable['head']['kernel'], start['head']['kernel'])
  merged = P.flatten(pj.merge(adapter, frozen, trainable['lora']))
  for path, leaf in P.flatten(params).items():
    if path in state:
      assert not np.array_equal(merged[path], leaf)
    else:
      np.testing.assert_array_equal(merged[path], leaf)


def test_pattern_and_argument_errors():
  params, _, _ = setup(8)
  key = jax.random.key(8)
  with pytest.raises(pj.PatternError,
                     match=r"'atention/query/kernel' matches no 2-D parameter path.*closest: "
                           r'encoder/layer_\d/attention/query/kernel'):
    pj.lora(['attention/value', 'atention/query/kernel']).init(key, params)
  with pytest.raises(pj.PatternError, match="2-D parameter.*closest"):
    pj.lora('attention/query/bias').init(key, params)
  with pytest.raises(pj.PatternError, match="rank_pattern: pattern 'layer_9'"):
    pj.lora(TARGETS, rank_pattern={'query': 2, 'layer_9': 2}).init(key, params)
  with pytest.raises(pj.PatternError, match="alpha_pattern: pattern 'attention/key'"):
    pj.lora(TARGETS, alpha_pattern={'attention/key': 2.0}).init(key, params)
  with pytest.raises(ValueError, match=r'rank 33 exceeds min\(32, 32\) of .*query/kernel'):
    pj.lora(TARGETS, rank=4, rank_pattern={'layer_1/attention/query': 33}).init(key, params)
  with pytest.raises(ValueError, match=r'rank 40 exceeds min\(32, 64\)'):
    pj.lora('intermediate/kernel', rank=40).init(key, params)
  for bad in (0, -1, 2.0):
    with pytest.raises(ValueError, match='must be a positive int'):
      pj.lora(TARGETS, rank=bad).init(key, params)
  with pytest.raises(ValueError, match="unknown LoRA init 'xavier'"):
    pj.lora(TARGETS, init_a='xavier')
  with pytest.raises(ValueError, match="unknown LoRA init 'ones'"):
    pj.lora(TARGETS, init_b='ones')
  for bad in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match=r'dropout must be in \[0, 1\)'):
      pj.lora(TARGETS, dropout=bad)


def test_adapter_dropout_is_random_in_training_and_off_in_eval():
  params, ids, mask = setup(9)
  noisy, plain = pj.lora(TARGETS, rank=4, dropout=0.5), pj.lora(TARGETS, rank=4)
  frozen, state = noisy.init(jax.random.key(9), params)
  state = randomize(state, 9)
  tree, tree_plain = noisy.apply(frozen, state), plain.apply(frozen, state)
  train = lambda t, seed: run(t, ids, mask, train=True, rngs={'dropout': jax.random.key(seed)})
  np.testing.assert_allclose(train(tree_plain, 1), run(tree_plain, ids, mask), atol=1e-6)
  a, b = train(tree, 1), train(tree, 2)
  assert float(jnp.abs(a - b).max()) > 1e-3
  np.testing.assert_array_equal(a, train(tree, 1))
  eval_out = run(tree, ids, mask)
  np.testing.assert_array_equal(eval_out, run(tree, ids, mask))
  np.testing.assert_allclose(eval_out, run(tree_plain, ids, mask), atol=1e-6)


def test_init_options_have_their_documented_distributions():
  params = {'d': {'kernel': jnp.zeros((256, 128))}}

  def init(seed, rank=8, **kwargs):
    return pj.lora('d', rank=rank, **kwargs).init(jax.random.key(seed), params)[1]['d/kernel']

  a = init(1)['a']
  bound = 1 / math.sqrt(256)
  assert -bound <= float(a.min()) < -0.95 * bound and 0.95 * bound < float(a.max()) <= bound
  assert float(jnp.std(a)) == pytest.approx(bound / math.sqrt(3), rel=0.05)
  assert float(jnp.abs(jnp.mean(a))) < 0.05 * bound
  assert not np.array_equal(a, init(2)['a'])
  for rank in (4, 16):
    g = init(3, rank, init_a='gaussian', init_b='gaussian')
    for m in (g['a'], g['b']):
      assert float(jnp.std(m)) == pytest.approx(1 / rank, rel=0.1)
      assert float(jnp.abs(jnp.mean(m))) < 0.2 / rank
  o = init(4, 8, init_a='orthogonal', init_b='orthogonal')
  np.testing.assert_allclose(o['a'].T @ o['a'], jnp.eye(8), atol=1e-5)
  np.testing.assert_allclose(o['b'] @ o['b'].T, jnp.eye(8), atol=1e-5)
  z = init(5, init_a='zeros', init_b='kaiming_uniform')
  assert float(jnp.abs(z['a']).max()) == 0
  assert 0.9 / math.sqrt(8) < float(jnp.abs(z['b']).max()) <= 1 / math.sqrt(8)


def test_nonzero_init_b_changes_the_model():
  params, ids, mask = setup(10)
  adapter = pj.lora(TARGETS, rank=4, init_b='gaussian')
  frozen, state = adapter.init(jax.random.key(10), params)
  assert float(jnp.abs(run(adapter.apply(frozen, state), ids, mask)
                       - run(params, ids, mask)).max()) > 1e-3
