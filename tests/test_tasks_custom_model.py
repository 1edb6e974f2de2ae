"""A model written only from `flax.linen` layers and a task defined here train through the
same trainer as the bundled ones, with structured leaves inside the standard layers."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import peftjax as pj
from configs import minilm_vader
from peftjax.models import Model
from peftjax.tasks.base import Task
from peftjax.train import step as S
from peftjax.train.loop import train

VOCAB, LENGTH, WIDTH, CLASSES = 40, 8, 16, 3  # (labels are 0 or 1)


class Classifier(nn.Module):
  """One attention block and an MLP from stock layers: Embed, DenseGeneral, Einsum (one with
  its kernel stored (out, in)), LayerNorm, Dense."""

  @nn.compact
  def __call__(self, ids, *, train: bool = False):
    x = nn.Embed(VOCAB, WIDTH, name='embed')(ids)
    q = nn.DenseGeneral(WIDTH, name='query')(x)
    k = nn.Einsum((WIDTH, WIDTH), '...d,de->...e', name='key')(x)
    att = jax.nn.softmax(jnp.einsum('bld,bmd->blm', q, k) / np.sqrt(WIDTH))
    x = nn.LayerNorm(name='norm')(x + att @ x)
    h = nn.gelu(nn.Dense(2 * WIDTH, name='up')(x))
    h = nn.Dropout(0.1, deterministic=not train)(h)
    return nn.Einsum((CLASSES, 2 * WIDTH), 'blf,cf->blc', name='out')(h).mean(1)


class Majority(Task):
  """Is most of the sequence from the lower half of the vocabulary?"""

  def __init__(self, seed=0, rows=(64, 32, 32)):
    rng = np.random.default_rng(seed)
    module = Classifier()
    ids = np.zeros((1, LENGTH), np.int32)
    self.model = Model(module, module.init(jax.random.key(seed), ids)['params'], 'classifier')
    self.data = {}
    for split, n in zip(self.splits, rows):
      x = rng.integers(0, VOCAB, (n, LENGTH)).astype(np.int32)
      self.data[split] = (x, ((x < VOCAB // 2).sum(1) > LENGTH // 2).astype(np.int32))

  def num_batches(self, split, batch_size):
    return -(-len(self.data[split][0]) // batch_size)

  def batches(self, split, batch_size, *, seed=None, epoch=0, start=0, rows=slice(None)):
    x, y = self.data[split]
    order = np.arange(len(x)) if seed is None else np.random.default_rng([seed, epoch]).permutation(len(x))
    for b in range(start, self.num_batches(split, batch_size)):
      real = order[b * batch_size:(b + 1) * batch_size]
      take = np.resize(real, batch_size)
      weights = (np.arange(batch_size) < len(real)).astype(np.float32)
      yield {'ids': x[take][rows], 'labels': y[take][rows], 'weights': weights[rows]}

  def logits(self, params, batch, rng=None):
    return self.model.apply(params, batch['ids'], train=rng is not None, rng=rng)

  def loss(self, params, head, batch, *, rng=None):
    losses = optax.softmax_cross_entropy_with_integer_labels(self.logits(params, batch, rng),
                                                             batch['labels'])
    return jnp.sum(losses * batch['weights']) / jnp.sum(batch['weights'])

  def eval_sums(self, params, head, batch):
    logits, w = self.logits(params, batch), batch['weights']
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['labels'])
    correct = (jnp.argmax(logits, -1) == batch['labels']).astype(jnp.float32)
    return {'loss': jnp.sum(losses * w), 'accuracy': jnp.sum(correct * w), 'count': jnp.sum(w)}


METHODS = {'lora': {'targets': ('kernel',), 'rank': 2, 'alpha': 4.0, 'dropout': 0.1},
           'pissa': {'targets': ('kernel',), 'rank': 2},
           'full': {}}


def config(method):
  c = minilm_vader.get_config(method)
  c.method = ml_collections.ConfigDict({'name': method, **METHODS[method]})
  c.optimizer.lr = 1e-2
  c.train.update({'batch_size': 16, 'eval_batch_size': 32, 'epochs': 3, 'log_every': 1,
                  'checkpoint_every': 0})
  c.mesh.data = 2
  return c


@pytest.mark.parametrize('method', list(METHODS))
def test_trains_through_the_trainer(tmp_path, method):
  summary = train(config(method), tmp_path, task=Majority())
  assert summary['steps'] == 12 and summary['base_model'] == 'classifier'
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').open()]
  losses = [r['loss'] for r in records if r['kind'] == 'val']
  assert losses[-1] < losses[0], losses
  adapter, _, _, _, _ = pj.load_adapter(tmp_path / 'adapter', Majority().model.params)
  assert adapter.config['method'] == method


def _random_lora(targets=METHODS['lora']['targets']):
  task = Majority()
  adapter = pj.from_config({'method': 'lora', **METHODS['lora'], 'targets': targets})
  frozen, state = adapter.init(jax.random.key(1), task.model.params)
  keys = iter(jax.random.split(jax.random.key(2), 100))
  state = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) / 4, state)
  return task, adapter, frozen, state


def test_structured_leaves_in_stock_layers_equal_the_merged_model():
  task, adapter, frozen, state = _random_lora()
  assert len(state) == 4  # query (DenseGeneral), key and out (Einsum), up (Dense)
  batch = next(task.batches('val', 32))
  structured = task.logits(adapter.apply(frozen, state), batch)
  merged = task.model.module.apply(
      {'params': pj.merge(adapter, frozen, state)}, batch['ids'])
  np.testing.assert_allclose(structured, merged, atol=1e-5)
  assert np.abs(merged - task.logits(task.model.params, batch)).max() > 1e-2  # it adapts
  # With the embedding adapted too (a row gather of the factors).
  task, adapter, frozen, state = _random_lora(('kernel', 'embedding'))
  np.testing.assert_allclose(task.logits(adapter.apply(frozen, state), batch),
                             task.model.module.apply({'params': pj.merge(adapter, frozen, state)},
                                                     batch['ids']), atol=1e-5)


def _dot_shapes(jaxpr) -> list[tuple]:
  """Output shapes of every dot_general in a jaxpr, its sub-jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      out.append(tuple(eqn.outvars[0].aval.shape))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _dot_shapes(sub)
  return out


def test_the_lora_step_forms_no_full_size_weight_or_gradient():
  task, adapter, frozen, state = _random_lora()
  tx = optax.adam(1e-3)
  step = S.make_train_step(task, adapter, tx, seed=0)
  trainable = {'adapter': state, 'head': {}}
  batch = jax.tree.map(jnp.asarray, next(task.batches('train', 16, seed=0)))
  jaxpr = jax.make_jaxpr(step)(S.init_state(trainable, tx), frozen, batch)
  kernels = {tuple(pj.flatten(frozen)[p].shape) for p in state}
  shapes = _dot_shapes(jaxpr.jaxpr)
  assert shapes and not kernels & set(shapes), sorted(set(shapes))
  # The same step on the merged weights (full fine-tuning) does form them: the check can tell.
  full = pj.full(('kernel',))
  frozen_f, state_f = full.init(jax.random.key(0), task.model.params)
  trainable_f = {'adapter': state_f, 'head': {}}
  jaxpr_f = jax.make_jaxpr(S.make_train_step(task, full, tx, seed=0))(
      S.init_state(trainable_f, tx), frozen_f, batch)
  assert kernels & set(_dot_shapes(jaxpr_f.jaxpr))
