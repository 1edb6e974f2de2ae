"""Half fine-tuning (`peftjax.methods.hft`): half of each block's matrices per category train,
chosen by seed; the frozen half stays bit-identical through real train steps; the optimiser
and the backward pass cover the trainable half only; each stage draws a new half."""
from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import safetensors.numpy

import peftjax as pj
from peftjax.core import paths as P
from peftjax.models import Model, t5
from peftjax.models.bert import Bert, BertConfig
from peftjax.models.llama import Llama, LlamaConfig
from peftjax.tasks.base import Task
from peftjax.train import step as S
from test_tasks_custom_model import _dot_shapes

# Every block kernel's shape differs from the tied embedding's (48, 16).
LLAMA = LlamaConfig(vocab_size=48, hidden_size=16, num_layers=3, num_heads=4, num_kv_heads=2,
                    intermediate_size=40)
# The modules of one block by the paper's categories, written out per model.
LLAMA_BLOCK = {'attention': ['self_attn/q_proj', 'self_attn/k_proj', 'self_attn/v_proj',
                             'self_attn/o_proj'],
               'ffn': ['mlp/gate_proj', 'mlp/up_proj', 'mlp/down_proj'],
               'norm': ['input_layernorm', 'post_attention_layernorm']}
BERT_BLOCK = {'attention': ['attention/query', 'attention/key', 'attention/value',
                            'attention/output'],
              'ffn': ['intermediate', 'output'], 'norm': ['attention_norm', 'output_norm']}
T5_DECODER_BLOCK = {'attention': ['attention/query', 'attention/key', 'attention/value',
                                  'attention/output'],
                    'cross': ['cross_attention/query', 'cross_attention/key',
                              'cross_attention/value', 'cross_attention/output'],
                    'ffn': ['mlp/wi_0', 'mlp/wi_1', 'mlp/wo'],
                    'norm': ['attention_norm', 'cross_attention_norm', 'mlp_norm']}


def random_params(init, *args):
  """Params of the shapes `init` makes (traced, not run): 1-D ones, the rest N(0, 0.1^2)."""
  shapes = jax.eval_shape(init, jax.random.key(0), *args)['params']
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype) if len(s.shape) == 1 else
                      jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


@functools.lru_cache(maxsize=None)
def llama_params():
  return random_params(Llama(LLAMA).init, jnp.zeros((1, 4), jnp.int32))


@functools.lru_cache(maxsize=None)
def bert_params():
  cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2,
                   intermediate_size=24, max_position_embeddings=16)
  ids = jnp.zeros((1, 4), jnp.int32)
  return random_params(Bert(cfg).init, ids, ids + 1)


@functools.lru_cache(maxsize=None)
def t5_params():
  cfg = t5.T5Config(vocab_size=32, d_model=16, num_heads=2, head_dim=8, d_ff=24,
                    encoder_layers=2, decoder_layers=5)
  module = t5.T5(cfg)
  ids = jnp.zeros((1, 4), jnp.int32)
  return random_params(module.init, ids, ids)


def trained_modules(state, block: str, modules: list[str]) -> list[str]:
  """The modules of `block` with params in `state`."""
  return [m for m in modules if any(p.startswith(f'{block}/{m}/') for p in state)]


def per_block_counts(params, state, prefix: str, num: int, layout: dict) -> list[dict]:
  flat = P.flatten(params)
  rows = []
  for i in range(num):
    block = f'{prefix}{i}'
    for mods in layout.values():  # each module's params are all in the state or all frozen
      for m in mods:
        owned = [p for p in flat if p.startswith(f'{block}/{m}/')]
        assert owned, (block, m)
        assert len({p in state for p in owned}) == 1, (block, m)
    rows.append({c: len(trained_modules(state, block, mods)) for c, mods in layout.items()})
  return rows


def test_half_of_each_blocks_matrices_per_category_train():
  """LLaMA: 2 of 4 attention, 1 of 2 norms, and of the 3 feed-forward matrices 2 in one half
  of the blocks, 1 in the other (3 blocks: 2 and 1); BERT: 2 of 4, 1 of 2, 1 of 2. Everything
  outside the blocks trains, or none of it with train_rest=False."""
  for seed in range(3):
    frozen, state = pj.hft(seed=seed).init(jax.random.key(0), llama_params())
    rows = per_block_counts(llama_params(), state, 'layers_', 3, LLAMA_BLOCK)
    assert all(r['attention'] == 2 and r['norm'] == 1 for r in rows), rows
    assert sorted(r['ffn'] for r in rows) == [1, 2, 2], rows
    assert {'embed_tokens/embedding', 'norm/scale'} <= set(state)
    flat = P.flatten(llama_params())
    assert set(state) | set(P.flatten(frozen)) == set(flat)
    assert not set(state) & set(P.flatten(frozen))
    for p, v in {**state, **P.flatten(frozen)}.items():
      assert v is flat[p]  # the values themselves, untouched

    _, state = pj.hft(seed=seed).init(jax.random.key(0), bert_params())
    rows = per_block_counts(bert_params(), state, 'encoder/layer_', 3, BERT_BLOCK)
    assert all(r == {'attention': 2, 'ffn': 1, 'norm': 1} for r in rows), rows
    outside = [p for p in P.flatten(bert_params()) if not p.startswith('encoder/')]
    assert set(outside) <= set(state)
    _, only_blocks = pj.hft(seed=seed, train_rest=False).init(jax.random.key(0), bert_params())
    assert set(only_blocks) == set(state) - set(outside)


def test_t5s_odd_categories_balance_over_the_blocks():
  """Cross-attention is a category of its own. Three feed-forward matrices in each of the 7
  blocks (2 encoder, 5 decoder): two train in 4 of them, one in 3; three norms in each
  decoder block (two in an encoder block): two train in 3 of the 5, one in 2."""
  for seed in range(3):
    _, state = pj.hft(seed=seed).init(jax.random.key(0), t5_params())
    dec = per_block_counts(t5_params(), state, 'decoder/layer_', 5, T5_DECODER_BLOCK)
    enc = per_block_counts(t5_params(), state, 'encoder/layer_', 2,
                           {k: v for k, v in T5_DECODER_BLOCK.items() if k != 'cross'} |
                           {'norm': ['attention_norm', 'mlp_norm']})
    assert all(r['attention'] == 2 and r['cross'] == 2 for r in dec), dec
    assert all(r['attention'] == 2 and r['norm'] == 1 for r in enc), enc
    assert sorted(r['ffn'] for r in dec + enc) == [1, 1, 1, 2, 2, 2, 2], (dec, enc)
    assert sorted(r['norm'] for r in dec) == [1, 1, 2, 2, 2], dec


def test_the_selection_is_the_seeds_alone():
  """The same seed selects the same half (whatever rng init gets); another seed another
  half; over seeds every pair of attention matrices and every layout of the feed-forward
  halves occurs."""
  params = llama_params()
  keys = lambda seed, rng=0: sorted(pj.hft(seed=seed).init(jax.random.key(rng), params)[1])
  assert keys(0) == keys(0, rng=7)
  assert keys(0) != keys(1)
  pairs, twos = collections.Counter(), collections.Counter()
  for seed in range(40):
    state = keys(seed)
    pairs[tuple(trained_modules(state, 'layers_0', LLAMA_BLOCK['attention']))] += 1
    rows = per_block_counts(params, state, 'layers_', 3, LLAMA_BLOCK)
    twos[tuple(i for i, r in enumerate(rows) if r['ffn'] == 2)] += 1
  assert len(pairs) == 6, pairs
  assert len(twos) == 3, twos  # the blocks where two train: each pair of the three


class NextToken(Task):
  """Next-token prediction on random sequences, for the tiny LLaMA."""
  selection, maximize = 'loss', False

  def __init__(self, length=12):
    module = Llama(LLAMA)
    self.model = Model(module, llama_params(), 'tiny-llama', module.logical_axes)
    rng = np.random.default_rng(0)
    self.data = {s: rng.integers(0, LLAMA.vocab_size, (32, length)).astype(np.int32)
                 for s in self.splits}

  def num_batches(self, split, batch_size):
    return len(self.data[split]) // batch_size

  def batches(self, split, batch_size, *, seed=None, epoch=0, start=0, rows=slice(None)):
    x = self.data[split]
    order = (np.arange(len(x)) if seed is None else
             np.random.default_rng([seed, epoch]).permutation(len(x)))
    for b in range(start, self.num_batches(split, batch_size)):
      take = x[order[b * batch_size:(b + 1) * batch_size]][rows]
      yield {'ids': take, 'weights': np.ones(take.shape[0], np.float32)}

  def loss(self, params, head, batch, *, rng=None):
    logits = self.model.apply(params, batch['ids'])[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['ids'][:, 1:]).mean()

  def eval_sums(self, params, head, batch):
    n = batch['ids'].shape[0]
    return {'loss': self.loss(params, head, batch) * n, 'count': jnp.asarray(n, jnp.float32)}


OPTIMIZER = ml_collections.ConfigDict({'lr': 1e-2, 'weight_decay': 0.01, 'b1': 0.9, 'b2': 0.999,
                                       'eps': 1e-8, 'schedule': 'constant', 'clip_norm': 1.0})


def _train(adapter, params, steps=3):
  """`steps` steps of the trainer's step and optimiser (AdamW) from `params`."""
  task = NextToken()
  frozen, state = adapter.init(jax.random.key(0), params)
  tx = S.make_optimizer(OPTIMIZER, adapter)
  step = jax.jit(S.make_train_step(task, adapter, tx, seed=0))
  train_state = S.init_state({'adapter': state, 'head': {}}, tx)
  for b in range(steps):
    batch = jax.tree.map(jnp.asarray, next(task.batches('train', 8, seed=b)))
    train_state, _ = step(train_state, frozen, batch)
  return frozen, state, train_state


@functools.lru_cache(maxsize=None)
def first_stage():
  """`(adapter, frozen, initial state, train state)` of HFT (seed 0) trained from the base."""
  adapter = pj.hft(seed=0)
  return adapter, *_train(adapter, llama_params())


def test_the_frozen_half_stays_bit_identical_and_adam_holds_the_trainable_half_only():
  adapter, frozen, state0, train_state = first_stage()
  state = train_state.trainable['adapter']
  base = P.flatten(llama_params())
  merged = P.flatten(pj.merge(adapter, frozen, state))
  for path in P.flatten(frozen):
    np.testing.assert_array_equal(merged[path], base[path], err_msg=path)
  for path in state:  # the trainable half moved by Adam steps (~lr = 1e-2 an entry), far
    # more than weight decay alone would (lr * 0.01 * |w| a step)
    change = np.abs(np.asarray(merged[path]) - np.asarray(base[path]))
    assert np.median(change) > 1e-3, path
  n = pj.num_params(state)
  in_blocks = lambda tree: sum(v.size for p, v in tree.items() if p.startswith('layers_'))
  assert 0.4 * in_blocks(base) < in_blocks(state) < 0.6 * in_blocks(base)
  arrays = [x for x in jax.tree.leaves(train_state.opt_state) if x.ndim]
  assert sum(x.size for x in arrays) == 2 * n  # Adam's two moments of the trainable half
  assert len(jax.tree.leaves(train_state.opt_state)) - len(arrays) <= 2  # and step counts
  assert jax.tree.structure(state) == jax.tree.structure(state0)


def test_the_step_forms_weight_gradients_for_the_trainable_half_only():
  """The backward pass's (in, out) products are those of the trainable block kernels: the
  frozen ones get none (full fine-tuning forms one per kernel)."""
  task = NextToken()
  batch = jax.tree.map(jnp.asarray, next(task.batches('train', 8, seed=0)))
  tx = optax.adam(1e-3)

  def kernel_gradients(adapter):
    frozen, state = adapter.init(jax.random.key(0), llama_params())
    jaxpr = jax.make_jaxpr(S.make_train_step(task, adapter, tx, seed=0))(
        S.init_state({'adapter': state, 'head': {}}, tx), frozen, batch)
    kernels = {tuple(v.shape) for p, v in P.flatten(llama_params()).items()
               if p.startswith('layers_') and p.endswith('kernel')}
    kernels |= {s[::-1] for s in kernels}  # (a product may form the transpose)
    return (collections.Counter(tuple(sorted(s)) for s in _dot_shapes(jaxpr.jaxpr)
                                if len(s) == 2 and s in kernels),
            collections.Counter(tuple(sorted(v.shape)) for p, v in state.items()
                                if p.startswith('layers_') and p.endswith('kernel')))

  formed, trainable = kernel_gradients(pj.hft(seed=1))
  assert formed == trainable and sum(trainable.values()) == 3 * 2 + 1 + 2 + 2  # 3 blocks
  formed_full, every = kernel_gradients(pj.full())
  assert formed_full == every and sum(every.values()) == 3 * 7


def test_each_stage_draws_a_new_half_and_starts_from_the_previous_result():
  """Two stages (start='merged'): stage 2's own frozen half is stage 1's result bit for bit;
  what neither stage trained is the base's; what only stage 1 trained keeps its change."""
  first, frozen1, _, ts1 = first_stage()
  after1 = pj.merge(first, frozen1, ts1.trainable['adapter'])
  second = pj.hft(seed=1)
  frozen2, _, ts2 = _train(second, after1)
  after2 = P.flatten(pj.merge(second, frozen2, ts2.trainable['adapter']))
  base, after1 = P.flatten(llama_params()), P.flatten(after1)
  trained1, trained2 = set(ts1.trainable['adapter']), set(ts2.trainable['adapter'])
  assert trained1 != trained2
  for path in P.flatten(frozen2):
    np.testing.assert_array_equal(after2[path], after1[path], err_msg=path)
    if path not in trained1:
      np.testing.assert_array_equal(after2[path], base[path], err_msg=path)
    else:
      assert not np.array_equal(after2[path], base[path]), path
  assert trained1 - trained2 and trained2 - trained1


def test_the_stage_config_gives_every_stage_its_own_seed():
  from configs import minilm_vader_hft
  from peftjax.train.stages import stage_configs
  for arg in ('', 'tiny'):
    stages = stage_configs(minilm_vader_hft.get_config(arg))
    seeds = [stage.method.seed for _, stage in stages]
    assert len(stages) >= 2 and len(set(seeds)) == len(seeds)
    assert all(stage.method.name == 'hft' for _, stage in stages)
    assert all(stage.start == 'merged' for _, stage in stages[1:])
    assert len({stage.data.domain for _, stage in stages}) == len(stages)


def test_the_file_holds_the_trainable_half_and_reloads_the_same_selection(tmp_path):
  adapter = pj.hft(seed=5)
  frozen, state = adapter.init(jax.random.key(0), llama_params())
  file = pj.save_adapter(tmp_path, adapter, frozen, state, base_model='tiny-llama')
  assert set(safetensors.numpy.load_file(str(file))) == {f'state/{p}' for p in state}
  loaded, frozen2, state2, _, _ = pj.load_adapter(tmp_path, llama_params(),
                                                  rng=jax.random.key(3))
  assert loaded.config == adapter.config and set(state2) == set(state)
  assert set(P.flatten(frozen2)) == set(P.flatten(frozen))


def test_bad_arguments_are_clear_errors():
  with pytest.raises(pj.PatternError, match='hft: blocks pattern .* matches no parameter path'):
    pj.hft(blocks=r'blocks_\d').init(jax.random.key(0), llama_params())
  with pytest.raises(ValueError, match='layers_0/mlp/down_proj/kernel is in block layers_0 '
                                       'but matches no category'):
    pj.hft(categories={'attention': '^self_attn/', 'norm': 'norm/'}).init(
        jax.random.key(0), llama_params())
  with pytest.raises(ValueError, match="category 'ffn' '\\(mlp' is not a valid regex"):
    pj.hft(categories={'ffn': '(mlp'})
  with pytest.raises(ValueError, match='seed must be an int'):
    pj.hft(seed=1.5)
  with pytest.raises(ValueError, match='non-empty'):
    pj.hft(categories={})


@pytest.mark.long
def test_the_domain_chain_reselects_each_stage(tmp_path):
  """`configs/minilm_vader_hft.py:tiny` through the stage runner: every stage trains its own
  half, and its frozen half is the previous stage's merged model bit for bit."""
  from configs import minilm_vader_hft
  from peftjax import models
  from peftjax.io.params_file import load_params
  from peftjax.train.stages import run_stages
  config = minilm_vader_hft.get_config('tiny')
  results = run_stages(config, tmp_path)
  names = list(config.stage_order)
  assert list(results) == names
  trained = []
  for prev, name in zip([None] + names[:-1], names):
    stage = config.stages[name]
    base = models.build(stage.model, stage.seed).params
    if prev is not None:
      base = load_params(tmp_path / prev / 'model.safetensors', base)
    _, frozen, state, _, _ = pj.load_adapter(tmp_path / name / 'adapter', base)
    flat = P.flatten(base)
    for path, leaf in P.flatten(frozen).items():
      np.testing.assert_array_equal(leaf, flat[path], err_msg=path)
    trained.append(set(state))
  assert all(a != b for a, b in zip(trained, trained[1:]))
