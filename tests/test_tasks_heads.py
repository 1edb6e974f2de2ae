"""Classification heads (`peftjax.tasks.heads`): efficient probing against a hand-written
reference of the paper's formula, its parameter count, training through the trainer with the
probe, and head files of one kind loaded as another."""
from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from peftjax import tasks
from peftjax.core.adapter import num_params
from peftjax.data import images
from peftjax.io.adapter_file import AdapterFileError, load_adapter, load_head
from peftjax.models import TINY_VIT, Model, build
from peftjax.tasks import heads
from peftjax.tasks.classification import SentenceClassification
from peftjax.tasks.image_classification import ImageClassification
from peftjax.train.loop import train
from tests.test_tasks_image_classification import LEVELS, brightness_levels, tiny_config

ATTENTIVE = heads.HeadSpec('attentive', queries=4, value_reduction=2)


def reference_pool(queries, value, tokens, mask):
  """Efficient probing written out per row and query: softmax over the row's real tokens of
  q_m · x_n / sqrt(d), then query m's weighted sum of its own d'/M channels of x_n W_v."""
  m, d = queries.shape
  group = value.shape[1] // m
  out = np.zeros((tokens.shape[0], value.shape[1]))
  for b in range(tokens.shape[0]):
    real = [n for n in range(tokens.shape[1]) if mask[b, n]]
    for q in range(m):
      scores = np.array([queries[q] @ tokens[b, n] / math.sqrt(d) for n in real])
      a = np.exp(scores - scores.max())
      a /= a.sum()
      for weight, n in zip(a, real):
        out[b, q * group:(q + 1) * group] += weight * (tokens[b, n] @ value)[
            q * group:(q + 1) * group]
  return out


def test_efficient_probing_is_the_papers_multi_query_cross_attention():
  width, classes = 16, 3
  head = heads.attentive(jax.random.key(0), width, classes, queries=4, value_reduction=2)
  assert {k: v.shape for k, v in head.items()} == {
      'queries': (4, 16), 'value': (16, 8), 'kernel': (8, 3), 'bias': (3,)}
  rng = np.random.default_rng(1)
  # fresh queries far from their small init, so that the attention is far from uniform
  head['queries'] = jnp.asarray(rng.normal(0, 1, (4, width)), jnp.float32)
  tokens = rng.normal(0, 1, (3, 7, width)).astype(np.float32)
  mask = np.ones((3, 7), np.int32)
  mask[1, 4:] = mask[2, 2:] = 0
  tokens[mask == 0] = 50.0  # padding that would dominate any softmax it entered
  got = heads.attentive_pool(head, jnp.asarray(tokens), jnp.asarray(mask))
  assert got.shape == (3, 8)
  want = reference_pool(np.asarray(head['queries'], np.float64),
                        np.asarray(head['value'], np.float64), tokens.astype(np.float64), mask)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # no mask: every token counts
  np.testing.assert_allclose(heads.attentive_pool(head, jnp.asarray(tokens)),
                             reference_pool(np.asarray(head['queries'], np.float64),
                                            np.asarray(head['value'], np.float64),
                                            tokens.astype(np.float64), np.ones_like(mask)),
                             atol=1e-4)
  # a row of padding alone (a weight-0 row of a padded batch) stays finite
  assert np.isfinite(heads.attentive_pool(head, jnp.asarray(tokens),
                                          jnp.zeros((3, 7), jnp.int32))).all()


def test_parameter_count_is_the_papers_formula():
  # M·d + d·d' + d'·K + K with d = 16, M = 4, d' = 16 / 2, K = 10: 64 + 128 + 80 + 10
  head = heads.attentive(jax.random.key(0), 16, 10, queries=4, value_reduction=2)
  assert num_params(head) == heads.attentive_params(16, 10, 4, 2) == 282
  # the linear probe on the same width: d·K + K
  assert num_params(heads.build(jax.random.key(0), heads.HeadSpec(), 16, 10)) == 170


def test_spec_and_size_errors_say_what_was_expected():
  c = ml_collections.ConfigDict({'head': {'kind': 'mlp'}})
  with pytest.raises(ValueError, match=r"unknown head.kind 'mlp'; expected one of "
                     r"\('linear', 'attentive'\)"):
    heads.spec(c)
  with pytest.raises(ValueError, match=r'head.queries must be a positive int, got 0'):
    heads.spec(ml_collections.ConfigDict({'head': {'kind': 'attentive', 'queries': 0}}))
  assert heads.spec(ml_collections.ConfigDict()) == heads.HeadSpec()
  with pytest.raises(ValueError, match=r'width / value_reduction divisible by queries: got '
                     r'width 16, value_reduction 2, queries 3'):
    heads.attentive(jax.random.key(0), 16, 10, queries=3, value_reduction=2)


@pytest.fixture(scope='module')
def vit():
  return build(ml_collections.ConfigDict(TINY_VIT))


def _task(vit, spec, n=(64, 32, 32)):
  data = {split: brightness_levels(k, seed) for seed, (split, k)
          in enumerate(zip(images.SPLITS, n))}
  return ImageClassification(vit, data, head=spec)


def test_the_attentive_probe_trains_and_saves_with_the_adapter(tmp_path, vit):
  task = _task(vit, ATTENTIVE)
  c = tiny_config({'name': 'probe'})
  c.head.update({'kind': 'attentive', 'queries': 4, 'value_reduction': 2})
  c.optimizer.lr = 1e-2
  summary = train(c, tmp_path, task=task)
  assert summary['trainable_params'] == heads.attentive_params(16, LEVELS, 4, 2)
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').open()]
  losses = [r['loss'] for r in records if r['kind'] == 'val']
  assert losses[-1] < 0.8 * losses[0], losses
  assert summary['test_accuracy'] > 0.5
  # the head is saved with the adapter and loads into a task with the same head
  _, _, _, saved, _ = load_adapter(tmp_path / 'adapter', vit.params)
  loaded = load_head(tmp_path / 'adapter', task.init_head(jax.random.key(1)))
  for key in ('queries', 'value', 'kernel', 'bias'):
    np.testing.assert_array_equal(loaded[key], saved[key])
  batch = next(task.batches('test', 8))
  assert jnp.argmax(task.logits(vit.params, loaded, batch), -1).shape == (8,)
  # ... and is a clear error in a task with a linear head
  linear = _task(vit, heads.HeadSpec())
  with pytest.raises(AdapterFileError, match=r"another kind: params \['queries', 'value'\] "
                     r"only in the file.*check head.kind"):
    load_head(tmp_path / 'adapter', linear.init_head(jax.random.key(1)))


def test_from_config_reads_the_head_block_and_needs_token_states(vit):
  c = tiny_config({'name': 'probe'})
  c.data.update({'name': 'digits', 'limit': 16})
  c.head.update({'kind': 'attentive', 'queries': 2, 'value_reduction': 1})
  task = tasks.build(c, vit)
  assert task.head_spec == heads.HeadSpec('attentive', 2, 1)
  head = task.init_head(jax.random.key(0))
  assert head['queries'].shape == (2, 16) and head['kernel'].shape == (16, 10)
  module = _PooledOnly()
  params = module.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))['params']
  pooled = ImageClassification(Model(module, params, 'pooled-only'), task.data, head=ATTENTIVE)
  with pytest.raises(ValueError, match=r'attentive head needs a model that returns token '
                     r'states \[B, tokens, width\] with tokens=True; pooled-only returns shape '
                     r'\(1, 8\)'):
    pooled.init_head(jax.random.key(0))


class _PooledOnly(nn.Module):
  @nn.compact
  def __call__(self, x, *, train=False, tokens=False):
    return nn.Dense(8)(x.reshape(x.shape[0], -1))


class _Embedder(nn.Module):
  """A stand-in encoder: token states are the tokens' embeddings (padding ones included)."""

  @nn.compact
  def __call__(self, input_ids, attention_mask, *, train=False):
    return nn.Embed(64, 16)(input_ids)


def test_sentence_classification_attends_to_real_tokens_only():
  module = _Embedder()
  ids = np.array([[5, 9, 3, 0, 0, 0], [4, 4, 8, 2, 6, 1]], np.int32)
  mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], np.int32)
  params = module.init(jax.random.key(0), ids, mask)['params']
  task = SentenceClassification(Model(module, params, 'embedder'),
                                {'train': ([], np.array([0, 2]))}, head=ATTENTIVE)
  head = task.init_head(jax.random.key(0))
  assert head['value'].shape == (16, 8) and head['kernel'].shape == (8, 3)
  head['queries'] = jax.random.normal(jax.random.key(1), head['queries'].shape)
  states = np.asarray(module.apply({'params': params}, ids, mask), np.float64)
  want = reference_pool(np.asarray(head['queries'], np.float64),
                        np.asarray(head['value'], np.float64), states, mask)
  want = want @ np.asarray(head['kernel'], np.float64) + np.asarray(head['bias'])
  got = task.logits(params, head, {'input_ids': ids, 'attention_mask': mask})
  np.testing.assert_allclose(got, want, atol=1e-5)
