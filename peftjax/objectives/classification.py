"""Weighted classification loss and accuracy (rows of weight 0 are padding)."""
from __future__ import annotations

import jax.numpy as jnp
import optax


def cross_entropy(logits, labels, weights):
  """Mean softmax cross-entropy over rows with weight > 0."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def eval_counts(logits, labels, weights):
  """Sums for exact aggregation over batches: loss, correct predictions, rows."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {'loss': jnp.sum(losses * weights), 'correct': jnp.sum(correct * weights),
          'count': jnp.sum(weights)}
