"""Mask tuning (R-AMT) and grafting on tiny models: the exact all-ones start, training that
only flips masks, gradient dropout's rate and seeding (alone and in the train step), bit-packed
adapter files, and grafting's exact ends and recovery of the entries that matter."""
from __future__ import annotations

import functools
import json
import math
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import safetensors.numpy

import peftjax as pj
from peftjax.core import paths as P
from peftjax.core.adapter import describe_targets
from peftjax.io.params_file import save_params
from peftjax.methods.mask_tuning import distillation, gradient_dropout, keep_probability
from peftjax.methods.grafting import GRAFT, grafted
from peftjax.models import Model
from peftjax.models.bert import Bert, BertConfig, Dense
from peftjax.tasks.base import Task
from peftjax.tasks.classification import SentenceClassification, cross_entropy, eval_counts
from peftjax.train import step as S

CFG = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                 intermediate_size=64, hidden_dropout=0.0, attention_dropout=0.0)
TARGETS = ['attention/(query|value)/kernel', 'intermediate/kernel']


@functools.lru_cache(maxsize=None)
def tiny():
  """A dropout-free tiny BERT as a sentence classifier, its head and one padded batch."""
  k_init, k_ids, k_len, k_lab, k_head = jax.random.split(jax.random.key(0), 5)
  ids = np.asarray(jax.random.randint(k_ids, (8, 12), 1, CFG.vocab_size), np.int32)
  lengths = np.asarray(jax.random.randint(k_len, (8, 1), 4, 13))
  mask = (np.arange(12)[None] < lengths).astype(np.int32)
  labels = np.asarray(jax.random.randint(k_lab, (8,), 0, 3), np.int32)
  module = Bert(CFG)
  params = module.init(k_init, jnp.asarray(ids), jnp.asarray(mask))['params']
  task = SentenceClassification(Model(module, params, 'tiny'),
                                {'train': ([r[:n] for r, n in zip(ids, lengths[:, 0])], labels)})
  batch = {'input_ids': ids * mask, 'attention_mask': mask, 'labels': labels,
           'weights': np.ones(8, np.float32)}
  return task, task.init_head(k_head), batch


class MLP(nn.Module):
  """up (8, 12), tanh, down (12, 6)."""

  @nn.compact
  def __call__(self, x):
    return Dense(6, name='down')(jnp.tanh(Dense(12, name='up')(x)))


def mlp(params, x):
  return MLP().apply({'params': params}, x)


class MLPClassification(Task):
  """Six classes from the MLP's outputs: unit-scale weights give gradients far above the
  1e-8 in gradient dropout's P (the tiny BERT's are near it)."""

  def __init__(self, params):
    self.model = Model(MLP(), params, 'mlp')

  def num_batches(self, split, batch_size):
    return 1

  def batches(self, split, batch_size, **kwargs):
    raise NotImplementedError('the tests hand batches to the step')

  def predictions(self, params, head, batch, *, rng=None):
    return self.model.apply(params, batch['x'], rng=rng), batch['weights']

  def loss(self, params, head, batch, *, rng=None):
    return cross_entropy(self.predictions(params, head, batch, rng=rng)[0], batch['labels'],
                         batch['weights'])

  def eval_sums(self, params, head, batch):
    return eval_counts(self.predictions(params, head, batch)[0], batch['labels'],
                       batch['weights'])


@functools.lru_cache(maxsize=None)
def mlp_task():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 8)).astype(np.float32)
  shapes = MLP().init(jax.random.key(0), x)['params']
  params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[0]),
                                              jnp.float32), shapes)
  batch = {'x': x, 'labels': rng.integers(0, 6, 16).astype(np.int32),
           'weights': np.ones(16, np.float32)}
  return MLPClassification(params), batch


def optimizer(adapter, lr):
  config = ml_collections.ConfigDict({'lr': lr, 'weight_decay': 0.0, 'b1': 0.9, 'b2': 0.999,
                                      'eps': 1e-8, 'schedule': 'constant', 'clip_norm': 0.0})
  return S.make_optimizer(config, adapter)


def train(adapter, frozen, state, head, *, steps, lr, seed=0, accumulate=1, on=None):
  task, _, batch = on or tiny()
  tx = optimizer(adapter, lr)
  step = jax.jit(S.make_train_step(task, adapter, tx, seed, accumulate=accumulate))
  train_state = S.init_state({'adapter': state, 'head': head}, tx)
  for _ in range(steps):
    train_state, _ = step(train_state, frozen, batch)
  return train_state.trainable['adapter']


def host(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def partly_off(state, every=3):
  """Scores with every `every`-th entry of each target below the threshold (5e-3)."""
  return {p: jnp.where(jnp.arange(s.size).reshape(s.shape) % every == 0, -0.02, s)
          for p, s in state.items()}


# ------------------------------------------------------------------------------ mask tuning
def test_an_all_ones_mask_is_the_base_model_exactly():
  task, head, batch = tiny()
  params = task.model.params
  adapter = pj.mask_tuning(TARGETS)
  frozen, state = adapter.init(jax.random.key(1), params)
  assert sorted(state) == sorted(P.select(P.flatten(params), TARGETS))
  assert all(bool(jnp.all(s == 1e-2)) for s in state.values())
  jax.tree.map(np.testing.assert_array_equal, pj.merge(adapter, frozen, state), params)
  np.testing.assert_array_equal(task.logits(adapter.apply(frozen, state), head, batch),
                                task.logits(params, head, batch))


def test_training_flips_masks_and_nothing_else():
  """The frozen weights stay bit-identical; effective weights differ from them exactly where
  a mask turned off (there they are 0), though many scores moved without crossing."""
  task, head, _ = tiny()
  params = task.model.params
  before = host(params)
  adapter = pj.mask_tuning(TARGETS)
  frozen, state = adapter.init(jax.random.key(1), params)
  new = train(adapter, frozen, state, head, steps=4, lr=2e-3)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), frozen, before)
  effective, base = P.flatten(host(pj.merge(adapter, frozen, new))), P.flatten(before)
  flipped_total = moved_on = 0
  for path, w in base.items():
    if path not in new:
      np.testing.assert_array_equal(effective[path], w)
      continue
    scores = np.asarray(new[path])
    off = scores <= 5e-3
    np.testing.assert_array_equal(effective[path][~off], w[~off])
    np.testing.assert_array_equal(effective[path][off], 0.0)
    flipped_total += int(off.sum())
    moved_on += int(((scores != 1e-2) & ~off).sum())
  assert flipped_total > 0 and moved_on > 0


def test_gradient_dropout_keeps_entries_with_the_papers_probability():
  n = 200_000
  g = jnp.asarray(np.random.default_rng(0).choice([-1.0, 1.0], n), jnp.float32)
  key = jax.random.key(0)
  kept = lambda h, lam=1.0: np.asarray(gradient_dropout(key, {'m': g}, {'m': h}, lam)['m'])
  sigma = math.sqrt(0.25 * 0.75 / n)
  # Opposed by a 3x larger divergence gradient: P = |g| / (|g| + |h|) = 1/4.
  out = kept(-3.0 * g)
  assert set(np.unique(out / np.asarray(g))) <= {0.0, 1.0}
  assert abs(np.mean(out != 0) - 0.25) < 5 * sigma
  assert abs(np.mean(kept(-g / 3.0) != 0) - 0.75) < 5 * sigma  # P = 3/4
  np.testing.assert_array_equal(kept(2.0 * g), g)  # agreeing signs: P = 1, all kept
  np.testing.assert_array_equal(kept(jnp.zeros_like(g)), g)  # no divergence: all kept
  half = kept(-3.0 * g, lam=0.5) / np.asarray(g)  # lambda < 1 scales instead of zeroing
  assert set(np.unique(half)) <= {0.5, 1.0}
  assert abs(np.mean(half == 0.5) - 0.75) < 5 * sigma
  np.testing.assert_allclose(keep_probability(jnp.array([2.0, -1.0, 1.0]),
                                                 jnp.array([-6.0, 4.0, 1.0])),
                             [0.25, 0.2, 1.0], atol=1e-6)


def test_gradient_dropout_is_reproducible_by_seed():
  g = {'a': jnp.ones((64, 64)), 'b': -jnp.ones((300,))}
  h = jax.tree.map(lambda x: -x, g)  # P = 1/2 everywhere
  draw = lambda seed: gradient_dropout(jax.random.key(seed), g, h)
  jax.tree.map(np.testing.assert_array_equal, draw(0), draw(0))
  assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.any(x != y)), draw(0), draw(1))))


def _loss_and_divergence_grads(adapter, frozen, state):
  task, batch = mlp_task()
  g = jax.grad(lambda s: task.loss(adapter.apply(frozen, s), {}, batch))(state)
  ref = task.predictions(frozen, {}, batch)[0]
  h = jax.grad(lambda s: distillation(task.predictions(adapter.apply(frozen, s), {}, batch)[0],
                                      ref, batch['weights']))(state)
  return g, h


def test_train_step_drops_opposed_mask_updates_by_seed():
  """With some masks off the masked model departs from the base one, so the divergence has a
  gradient: a step drops (updates by exactly 0) entries with the probability 1 - P of the
  loss's and the divergence's gradients (never where they agree), the same ones for the same
  seed and other ones for another. Without gradient dropout the seed changes nothing (the
  model has no dropout)."""
  task, batch = mlp_task()
  adapter = pj.mask_tuning('kernel')
  frozen, state = adapter.init(jax.random.key(1), task.model.params)
  state = partly_off(state)
  step = lambda a, seed: jax.tree.map(lambda new, old: np.asarray(new - old), train(
      a, frozen, state, {}, steps=1, lr=1e-3, seed=seed, on=(task, {}, batch)), state)
  plain = pj.mask_tuning('kernel', gradient_dropout_lambda=0.0)
  assert plain.guide is None
  full_update = step(plain, 0)
  jax.tree.map(np.testing.assert_array_equal, full_update, step(plain, 1))
  first, again, other = step(adapter, 0), step(adapter, 0), step(adapter, 1)
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert any(np.any((first[p] == 0) != (other[p] == 0)) for p in state)
  g, h = _loss_and_divergence_grads(adapter, frozen, state)
  drop_p = {p: 1.0 - np.asarray(keep_probability(g[p], h[p])) for p in state}
  seeds = range(4)
  dropped_total = agreeing = 0
  for update in [first, other] + [step(adapter, seed) for seed in seeds[2:]]:
    for path in state:
      gp, hp = np.asarray(g[path]), np.asarray(h[path])
      dropped = (update[path] == 0) & (full_update[path] != 0)
      dropped_total += int(dropped.sum())
      clear = np.abs(gp) > 1e-5  # P's 1e-8 plays no part
      agreeing += int(np.sum(dropped & clear & (np.sign(gp) == np.sign(hp))))
  expected = len(seeds) * sum(float(q.sum()) for q in drop_p.values())
  spread = math.sqrt(len(seeds) * sum(float(np.sum(q * (1 - q))) for q in drop_p.values()))
  assert agreeing == 0 and expected > 50
  assert abs(dropped_total - expected) < 4 * spread


def test_gradient_accumulation_gives_the_guided_update_of_the_whole_batch():
  """The loss's and the divergence's gradients are both summed over micro-batches before
  gradient dropout sees them."""
  task, batch = mlp_task()
  adapter = pj.mask_tuning('kernel')
  frozen, state = adapter.init(jax.random.key(1), task.model.params)
  state = partly_off(state)
  whole, split = (train(adapter, frozen, state, {}, steps=1, lr=1e-3, accumulate=k,
                        on=(task, {}, batch)) for k in (1, 2))
  moved = jax.tree.map(lambda a, b: np.asarray(a != b), whole, state)
  assert 0 < np.mean(np.concatenate([m.ravel() for m in jax.tree.leaves(moved)])) < 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), split, whole)


def test_adapter_file_holds_bit_packed_masks(tmp_path):
  task, head, batch = tiny()
  params = task.model.params
  adapter = pj.mask_tuning(TARGETS)
  frozen, state = adapter.init(jax.random.key(1), params)
  rng = np.random.default_rng(0)
  state = {p: jnp.asarray(rng.uniform(-0.01, 0.02, s.shape), s.dtype) for p, s in state.items()}
  weights = pj.save_adapter(tmp_path, adapter, frozen, state)
  packed = {p: math.ceil(s.size / 8) for p, s in state.items()}
  tensors = safetensors.numpy.load_file(str(weights))
  assert {k: (v.dtype, v.shape) for k, v in tensors.items()} == {
      f'state/{p}': (np.uint8, (n,)) for p, n in packed.items()}
  raw = weights.read_bytes()
  header = struct.unpack('<Q', raw[:8])[0]
  assert len(raw) - 8 - header == sum(packed.values())  # one bit per entry, nothing more
  assert len(raw) < sum(packed.values()) + 1024
  for p, s in state.items():
    np.testing.assert_array_equal(
        np.unpackbits(tensors[f'state/{p}'], count=s.size).reshape(s.shape),
        np.asarray(s) > 5e-3)
  loaded, frozen2, state2, _, meta = pj.load_adapter(tmp_path, params)
  assert {p: info['masked'] for p, info in meta['targets'].items()} == {
      p: int(np.sum(np.asarray(s) <= 5e-3)) for p, s in state.items()}
  jax.tree.map(np.testing.assert_array_equal, pj.merge(loaded, frozen2, state2),
               pj.merge(adapter, frozen, state))
  np.testing.assert_array_equal(task.logits(loaded.apply(frozen2, state2), head, batch),
                                task.logits(adapter.apply(frozen, state), head, batch))
  for p, s in state2.items():
    np.testing.assert_array_equal(
        s, np.where(np.asarray(state[p]) > 5e-3, 1e-2, 0.0).astype(np.float32))
  # A packed mask of the wrong length is a clear error.
  path = next(iter(packed))
  tensors[f'state/{path}'] = tensors[f'state/{path}'][:-1]
  safetensors.numpy.save_file(tensors, str(weights))
  with pytest.raises(pj.AdapterFileError,
                     match=rf'{path}: expected \({packed[path]},\), found \({packed[path] - 1},\)'):
    pj.load_adapter(tmp_path, params)


def test_chains_encode_and_guide_only_their_mask_tuning_part(tmp_path):
  task, _, _ = tiny()
  params = task.model.params
  adapter = pj.chain(pj.mask_tuning('attention/query/kernel'), pj.lora('value/kernel', rank=2))
  frozen, (masks, lora) = adapter.init(jax.random.key(1), params)
  states = (partly_off(masks), jax.tree.map(lambda x: x + 0.1, lora))
  pj.save_adapter(tmp_path, adapter, frozen, states)
  loaded, frozen2, states2, _, _ = pj.load_adapter(tmp_path, params)
  jax.tree.map(np.testing.assert_array_equal, pj.merge(loaded, frozen2, states2),
               pj.merge(adapter, frozen, states))
  ones = jax.tree.map(jnp.ones_like, states)
  out = adapter.guide.combine(jax.random.key(0), ones, jax.tree.map(lambda x: -x, ones))
  jax.tree.map(np.testing.assert_array_equal, out[1], ones[1])  # LoRA's gradients untouched
  assert 0 < float(np.mean([np.mean(np.asarray(x) == 0) for x in jax.tree.leaves(out[0])])) < 1
  with pytest.raises(ValueError, match='one guided method'):
    pj.chain(pj.mask_tuning('query/kernel'), pj.mask_tuning('value/kernel'))


def test_mask_tuning_arguments_are_checked():
  with pytest.raises(ValueError, match='scale > threshold'):
    pj.mask_tuning('kernel', scale=1e-3, threshold=5e-3)
  with pytest.raises(ValueError, match=r'gradient_dropout_lambda must be in \[0, 1\], got 2'):
    pj.mask_tuning('kernel', gradient_dropout_lambda=2)


# ---------------------------------------------------------------------------------- grafting
@functools.lru_cache(maxsize=None)
def grafting_problem():
  """Pretrained params, a fine-tuned copy whose change that matters sits in 6 known kernel
  entries (|change| 1), a larger decoy change (|change| 3) on the 12 weights of input 7,
  which the data never feeds (x[:, 7] = 0), and the data."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 8)).astype(np.float32)
  x[:, 7] = 0.0
  shapes = MLP().init(jax.random.key(0), x)['params']
  pre = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[0]),
                                           jnp.float32), shapes)
  known = {'up/kernel': [(0, 1), (2, 5), (4, 9), (6, 0)], 'down/kernel': [(3, 2), (10, 4)]}
  flat = {p: np.array(v) for p, v in P.flatten(pre).items()}
  for path, entries in known.items():
    for i, j in entries:
      flat[path][i, j] += 1.0
  flat['up/kernel'][7, :] += 3.0
  ft = P.unflatten({p: jnp.asarray(v) for p, v in flat.items()})
  return pre, ft, x, known


def test_graft_with_all_ones_is_the_finetuned_tree_and_with_zeros_the_pretrained():
  pre, _, _, _ = grafting_problem()
  rng = np.random.default_rng(3)
  ft = jax.tree.map(lambda v: jnp.asarray(rng.standard_normal(v.shape), v.dtype), pre)
  adapter = pj.graft('kernel', ft)
  frozen, state = adapter.init(jax.random.key(0), pre)
  ones = {p: jnp.ones(s.shape) for p, s in state.items()}
  zeros = {p: jnp.zeros(s.shape) for p, s in state.items()}
  want_ft = {**pre, 'up': {**pre['up'], 'kernel': ft['up']['kernel']},
             'down': {**pre['down'], 'kernel': ft['down']['kernel']}}
  jax.tree.map(np.testing.assert_array_equal, grafted(frozen, ones), want_ft)
  jax.tree.map(np.testing.assert_array_equal, grafted(frozen, zeros), pre)
  # The same through the method: scores of +inf / -inf are gammas of exactly 1 / 0.
  inf = {p: jnp.full(s.shape, jnp.inf) for p, s in state.items()}
  jax.tree.map(np.testing.assert_array_equal, adapter.apply(frozen, inf), want_ft)
  jax.tree.map(np.testing.assert_array_equal,
               adapter.apply(frozen, jax.tree.map(lambda s: -s, inf)), pre)


def test_the_base_patch_is_the_top_fraction_by_change():
  pre, ft, _, _ = grafting_problem()
  adapter = pj.graft('kernel', ft, sparsity=6 / 168)
  frozen, state = adapter.init(jax.random.key(0), pre)
  patch, used = pj.binarized_graft(adapter, frozen, state)
  assert used == 6 / 168
  # The 6 largest changes are 6 of the 12 decoys (ties: the first in order).
  on = np.asarray(state['up/kernel']) > 10.0
  assert on[7, :6].all() and on.sum() == 6 and not np.any(np.asarray(state['down/kernel']) > 10)
  gammas = jax.nn.sigmoid(jnp.concatenate([s.ravel() for s in state.values()]) - 10.0)
  assert float(jnp.max(jnp.minimum(gammas, 1 - gammas))) < 1.3e-4
  info = describe_targets(adapter, frozen, state)
  assert info['up/kernel'] == {'shape': [8, 12], 'trainable': 96, 'grafted': 6}
  assert json.loads(json.dumps(info)) == info


def test_grafting_finds_the_entries_that_matter():
  """From a base patch of decoys, the optimisation (loss: distance to the fine-tuned model's
  outputs, plus l1 * ||gamma||_1) grafts exactly the 6 entries that change the function, and
  the binary graft of that fraction reproduces the fine-tuned model."""
  pre, ft, x, known = grafting_problem()
  fraction = 6 / 168
  adapter = pj.graft('kernel', ft, sparsity=fraction, l1=1e-3)
  frozen, state = adapter.init(jax.random.key(0), pre)
  target = mlp(ft, x)
  loss = lambda s: jnp.mean((mlp(adapter.apply(frozen, s), x) - target) ** 2) + pj.regularizer(
      adapter, s)
  tx = optax.adam(0.5)

  @jax.jit
  def update(s, opt):
    grads = jax.grad(loss)(s)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(s, updates), opt

  opt = tx.init(state)
  for _ in range(150):
    state, opt = update(state, opt)
  for rounded in (None, fraction):
    params, used = pj.binarized_graft(adapter, frozen, state, fraction=rounded)
    assert used == fraction
    for path, entries in known.items():
      changed = np.argwhere(np.asarray(P.flatten(params)[path] != P.flatten(pre)[path]))
      assert sorted(map(tuple, changed)) == sorted(entries)
    pre_loss = float(jnp.mean((mlp(pre, x) - target) ** 2))
    assert float(jnp.mean((mlp(params, x) - target) ** 2)) < 1e-10 * pre_loss


def test_graft_reads_the_finetuned_tree_from_a_params_file_or_an_adapter(tmp_path):
  pre, ft, _, _ = grafting_problem()
  from_tree = pj.graft('kernel', ft).init(jax.random.key(0), pre)
  path = save_params(tmp_path / 'ft.safetensors', ft)
  from_file = pj.graft('kernel', str(path)).init(jax.random.key(0), pre)
  full = pj.full('kernel')
  frozen, _ = full.init(jax.random.key(0), pre)
  pj.save_adapter(tmp_path / 'run', full, frozen, full.init(jax.random.key(0), ft)[1])
  from_run = pj.graft('kernel', str(tmp_path / 'run')).init(jax.random.key(0), pre)
  jax.tree.map(np.testing.assert_array_equal, from_file, from_tree)
  jax.tree.map(np.testing.assert_array_equal, from_run, from_tree)
  assert set(P.flatten(from_tree[0][GRAFT])) == {'up/kernel', 'down/kernel'}
  assert pj.graft('kernel', ft).config['finetuned'] is None
  with pytest.raises(ValueError, match='graft needs the fine-tuned params'):
    pj.from_config(pj.graft('kernel', ft).config)
  with pytest.raises(ValueError, match='graft: the fine-tuned up/kernel is'):
    bad = {**ft, 'up': {**ft['up'], 'kernel': jnp.zeros((8, 3))}}
    pj.graft('kernel', bad).init(jax.random.key(0), pre)



def _graft_config_optimizer(adapter):
  """The trainer's optimiser for the study's `graft` config (`configs/minilm_vader.py`)."""
  from configs import minilm_vader  # pylint: disable=g-import-not-at-top
  config = minilm_vader.get_config('graft')
  return S.make_optimizer(config.optimizer, adapter), config


def _classification_graft(scale: float, sparsity: float = 0.05):
  """A linear 3-class classifier: a pretrained kernel, a fine-tuned one `scale` times a random
  change away, inputs labelled by the fine-tuned model; the graft of the kernel, the
  cross-entropy as a function of the kernel and of the graft's scores."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((256, 16)).astype(np.float32)
  pre = {'cls': {'kernel': jnp.asarray(0.1 * rng.standard_normal((16, 3)), jnp.float32)}}
  ft = {'cls': {'kernel': pre['cls']['kernel']
                + jnp.asarray(scale * rng.standard_normal((16, 3)), jnp.float32)}}
  labels = jnp.argmax(x @ ft['cls']['kernel'], -1)
  adapter = pj.graft('kernel', ft, sparsity=sparsity)
  frozen, state = adapter.init(jax.random.key(0), pre)

  def ce(kernel):
    logp = jax.nn.log_softmax(x @ kernel)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1))
  return adapter, frozen, state, ce, lambda s: ce(adapter.apply(frozen, s)['cls']['kernel'])


def _trainer_steps(tx, state, loss, steps):
  """`steps` of the trainer's optimiser on the scores, with a head it must leave alone."""
  head = {'w': jnp.ones(3)}
  trainable = {'adapter': state, 'head': head}
  opt = tx.init(trainable)
  out = [state]
  for _ in range(steps):
    grads = {'adapter': jax.grad(loss)(trainable['adapter']), 'head': {'w': jnp.ones(3)}}
    updates, opt = tx.update(grads, opt, trainable)
    trainable = optax.apply_updates(trainable, updates)
    out.append(trainable['adapter'])
  np.testing.assert_array_equal(trainable['head']['w'], head['w'])  # the head stays frozen
  return out


def test_graft_config_takes_the_official_plain_gradient_steps():
  """The official code (src/graft_trainer.py) keeps scores S' for γ = s + (1 - 2s)
  sigmoid(S' - 10) (s: the base patch) and steps S' -= lr (1 - 2s) dL/dθ (θ_ft - θ_pre)
  sigmoid'(S' - 10) at lr 1e7, with no optimiser. The trainer's optimiser for the `graft`
  config takes the same steps on the mirrored scores (S = 2b - S' on the patch), although
  the scores' gradients are far below AdamW's usual eps of 1e-8."""
  adapter, frozen, state, ce, loss = _classification_graft(3e-4)
  tx, config = _graft_config_optimizer(adapter)
  assert config.optimizer.head_lr_scale == 0.0 and config.train.max_steps == 10
  assert config.train.batch_size == 1024 and config.train.accumulate == 32
  assert config.method.targets == (r'encoder/layer_\d+/',)
  grads = jax.grad(loss)(state)
  assert 0 < max(float(jnp.max(jnp.abs(g))) for g in grads.values()) < 1e-8
  b, lr = 10.0, 1e7
  pre_k, ft_k = frozen['cls']['kernel'], frozen[GRAFT]['cls']['kernel']
  patch = np.asarray(state['cls/kernel']) > b
  official = np.where(patch, 2 * b - np.asarray(state['cls/kernel'], np.float64),
                      np.asarray(state['cls/kernel'], np.float64))
  ours = _trainer_steps(tx, state, loss, 5)
  for scores in ours[1:]:
    gamma = patch + (1 - 2 * patch) * jax.nn.sigmoid(jnp.asarray(official, jnp.float32) - b)
    d_theta = np.asarray(jax.grad(ce)(pre_k + gamma * (ft_k - pre_k)), np.float64)
    sig = 1 / (1 + np.exp(-(official - b)))
    official = official - lr * (1 - 2 * patch) * d_theta * np.asarray(ft_k - pre_k) * sig * (
        1 - sig)
    mirrored = np.where(patch, 2 * b - official, official)
    step = np.abs(mirrored - np.asarray(state['cls/kernel']))
    assert step.max() > 1e-2  # real steps, not swallowed by eps
    np.testing.assert_allclose(np.asarray(scores['cls/kernel']), mirrored, rtol=0,
                               atol=1e-5 + 1e-3 * step.max())


def test_graft_config_moves_the_mask_where_adamw_at_eps_1e8_does_not():
  """On a task where the official 10 plain steps at lr 1e7 change the rounded mask (and
  lower the loss), the trainer's optimiser for the `graft` config does the same; AdamW as the
  config had it before (lr 5e-2, eps 1e-8: steps of about lr) leaves every entry where it
  started."""
  adapter, frozen, state, _, loss = _classification_graft(0.1, sparsity=0.1)
  tx, config = _graft_config_optimizer(adapter)
  steps = config.train.max_steps
  start = np.asarray(state['cls/kernel']) > 10.0
  final = _trainer_steps(tx, state, loss, steps)[-1]
  flipped = int(np.sum((np.asarray(final['cls/kernel']) > 10.0) != start))
  assert flipped > 0 and float(loss(final)) < float(loss(state))
  old = S.make_optimizer(ml_collections.ConfigDict(
      {'lr': 5e-2, 'b1': 0.9, 'b2': 0.999, 'eps': 1e-8, 'weight_decay': 0.01,
       'schedule': 'constant', 'warmup_steps': 0, 'clip_norm': 0.0, 'head_lr_scale': 0.0}),
      adapter)
  stuck = _trainer_steps(old, state, loss, steps)[-1]
  np.testing.assert_array_equal(np.asarray(stuck['cls/kernel']) > 10.0, start)
