"""Sentence classification: mean-pooled encoder states and a linear head (or an attentive
head over the states, `head.kind='attentive'`, `peftjax.tasks.heads`), cross-entropy.

The data are VADER's human-rated sentences (any of its four domains, `peftjax.data.vader`);
the model is any encoder called as `module(input_ids, attention_mask, train=)` that returns
hidden states [B, L, H] (the bundled BERT / MiniLM by default). Metrics: loss and accuracy.
"""
from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax.data import vader
from peftjax.models import Model, build
from peftjax.models.bert import mean_pool
from peftjax.tasks import heads
from peftjax.tasks.base import Task
from peftjax.tasks.heads import linear as init_head  # noqa: F401 (re-exported)


def cross_entropy(logits, labels, weights):
  """Mean softmax cross-entropy over rows with weight > 0."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def eval_counts(logits, labels, weights):
  """Sums for exact aggregation over batches: loss, correct predictions (`accuracy`), rows."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {'loss': jnp.sum(losses * weights), 'accuracy': jnp.sum(correct * weights),
          'count': jnp.sum(weights)}


class Classification(Task):
  """A task whose `logits(params, head, batch, rng=)` score classes: cross-entropy loss,
  loss and accuracy sums for evaluation, over the batch's `labels` and `weights`."""

  def predictions(self, params, head, batch, *, rng=None):
    return self.logits(params, head, batch, rng=rng), batch['weights']

  def loss(self, params, head, batch, *, rng=None):
    return cross_entropy(self.logits(params, head, batch, rng=rng), batch['labels'],
                         batch['weights'])

  def eval_sums(self, params, head, batch):
    return eval_counts(self.logits(params, head, batch), batch['labels'], batch['weights'])


class SentenceClassification(Classification):
  """Classify token sequences with a linear head on the model's mean-pooled states.

  Args:
    model: the encoder.
    data: `{split: (token arrays, labels)}`.
    max_length: longest sequence (batches are padded to multiples of `bucket` up to it).
    bucket: padding granularity (one compiled shape per multiple).
    group_by_length: > 0 batches similar lengths together in groups of that many batches.
    num_classes: default: the largest training label + 1.
    head: the head's kind and sizes (`heads.HeadSpec`; default: linear on mean-pooled states).
  """

  def __init__(self, model: Model, data: dict, *, max_length: int = 64, bucket: int = 16,
               group_by_length: int = 0, num_classes: int | None = None,
               head: heads.HeadSpec = heads.HeadSpec()):
    self.model, self.data, self.head_spec = model, data, head
    self.max_length, self.bucket, self.group_by_length = max_length, bucket, group_by_length
    self.num_classes = num_classes or int(data['train'][1].max()) + 1

  @classmethod
  def from_config(cls, config, model: Model | None = None) -> SentenceClassification:
    """VADER's `config.data.domain` (the first `limit` rows of each split if `limit` > 0),
    tokenised for `config.model` (built from the config unless `model` is given)."""
    from peftjax.models import minilm
    d = config.data
    if d.name != 'vader':
      raise ValueError(f"unknown data set {d.name!r} for sentence classification; "
                       "expected 'vader'")
    tokenizer = minilm.load_tokenizer(max_length=d.max_length)
    model = model or build(config.model, config.seed)
    data = {}
    for name, split in vader.load_split(d.domain).items():
      n = d.limit or len(split)
      data[name] = (vader.encode(tokenizer, split.texts[:n], d.max_length), split.labels[:n])
    return cls(model, data, max_length=d.max_length, bucket=d.bucket,
               group_by_length=d.group_by_length, head=heads.spec(config))

  def num_batches(self, split, batch_size):
    return vader.num_batches(len(self.data[split][0]), batch_size)

  def batches(self, split, batch_size, *, seed=None, epoch=0, start=0,
              rows=slice(None)) -> Iterator[dict]:
    return vader.batches(*self.data[split], batch_size, seed=seed, epoch=epoch, start=start,
                         bucket=self.bucket, rows=rows, group_by_length=self.group_by_length)

  def batch_shapes(self, batch_size):
    def spec(width):
      tokens = jax.ShapeDtypeStruct((batch_size, width), np.int32)
      rows = jax.ShapeDtypeStruct((batch_size,), np.int32)
      return {'input_ids': tokens, 'attention_mask': tokens, 'labels': rows,
              'weights': jax.ShapeDtypeStruct((batch_size,), np.float32)}
    return [spec(w) for w in range(self.bucket, self.max_length + self.bucket, self.bucket)]

  @property
  def width(self) -> int:
    ids = jax.ShapeDtypeStruct((1, self.bucket), np.int32)
    return jax.eval_shape(lambda p, i: self.model.apply(p, i, i), self.model.params,
                          ids).shape[-1]

  def init_head(self, rng):
    return heads.build(rng, self.head_spec, self.width, self.num_classes)

  def logits(self, params, head, batch, *, rng=None):
    mask = batch['attention_mask']
    hidden = self.model.apply(params, batch['input_ids'], mask, train=rng is not None, rng=rng)
    pooled = (heads.attentive_pool(head, hidden, mask) if self.head_spec.attentive
              else mean_pool(hidden, mask))
    return pooled @ head['kernel'] + head['bias']


  def calibration_mask(self, batch):
    return batch['attention_mask'] * batch['weights'][:, None]
