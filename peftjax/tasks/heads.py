"""Classification heads: a linear layer on pooled features (`linear`), or efficient probing
(`attentive`), a multi-query cross-attention over the model's token states.

Efficient probing (EP): "Attention, Please! Revisiting Attentive Probing for Masked Image
Modeling" (Psomas et al., 2025, arXiv:2506.10178; official code
github.com/billpsomas/efficient-probing, `poolings/ep.py`). M learned queries Q [M, d] attend
to the token states X [N, d] themselves (no key projection, no output projection); one value
projection W_v [d, d'] (d' = d / value_reduction, no bias) is split into M groups of d' / M
channels, one per query:

  A   = softmax over tokens of Q Xᵀ / sqrt(d)             [M, N]  (padding tokens get 0)
  o   = concat over m of  A[m] · (X W_v)[:, group m]        [d']
  out = o W + b                                             the linear head on o

Trainable params: M·d + d·d' + d'·K + K for K classes (`attentive_params`); the linear head
has d·K + K. Initialised as the official module: Q ~ N(0, 0.02²); W_v, W and b as torch's
`nn.Linear` (U(±1/sqrt(fan_in))).

Deviations from the official probe: no non-affine BatchNorm before the classifier (the
project's linear probe has none either, and its running statistics would be state outside
the trainable tree); one attention head, the setting of all the official runs.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

KINDS = ('linear', 'attentive')


class HeadSpec(NamedTuple):
  """A head's kind and, for `attentive`, its sizes: `queries` (M) and `value_reduction`
  (d / d', the official `d_out`)."""
  kind: str = 'linear'
  queries: int = 8
  value_reduction: int = 1

  @property
  def attentive(self) -> bool:
    return self.kind == 'attentive'


def spec(config) -> HeadSpec:
  """The `HeadSpec` of a config's `head` block (`kind`, `queries`, `value_reduction`; the
  defaults where the block or a key is absent)."""
  block = dict(config.get('head') or {})
  default = HeadSpec()
  out = HeadSpec(block.get('kind', default.kind), block.get('queries', default.queries),
                 block.get('value_reduction', default.value_reduction))
  if out.kind not in KINDS:
    raise ValueError(f'unknown head.kind {out.kind!r}; expected one of {KINDS}')
  for name in ('queries', 'value_reduction'):
    value = getattr(out, name)
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
      raise ValueError(f'head.{name} must be a positive int, got {value!r}')
  return out


def linear(rng, width: int, num_classes: int) -> dict:
  """A linear head with torch's Linear init, U(-1/sqrt(width), 1/sqrt(width))."""
  bound = 1.0 / math.sqrt(width)
  k1, k2 = jax.random.split(rng)
  return {'kernel': jax.random.uniform(k1, (width, num_classes), jnp.float32, -bound, bound),
          'bias': jax.random.uniform(k2, (num_classes,), jnp.float32, -bound, bound)}


def value_width(width: int, queries: int, value_reduction: int) -> int:
  """d' = width / value_reduction, checked to split evenly over the queries."""
  if width % value_reduction or (width // value_reduction) % queries:
    raise ValueError(f'efficient probing needs width / value_reduction divisible by queries: '
                     f'got width {width}, value_reduction {value_reduction}, queries {queries}')
  return width // value_reduction


def attentive(rng, width: int, num_classes: int, *, queries: int = 8,
              value_reduction: int = 1) -> dict:
  """An efficient-probing head (module docstring) on tokens of `width`:
  `{'queries' [M, d], 'value' [d, d'], 'kernel' [d', K], 'bias' [K]}`."""
  narrow = value_width(width, queries, value_reduction)
  k_queries, k_value, k_linear = jax.random.split(rng, 3)
  bound = 1.0 / math.sqrt(width)
  return {'queries': 0.02 * jax.random.normal(k_queries, (queries, width), jnp.float32),
          'value': jax.random.uniform(k_value, (width, narrow), jnp.float32, -bound, bound),
          **linear(k_linear, narrow, num_classes)}


def build(rng, head_spec: HeadSpec, width: int, num_classes: int) -> dict:
  """The head `head_spec` describes, on features (linear) or tokens (attentive) of `width`."""
  if head_spec.attentive:
    return attentive(rng, width, num_classes, queries=head_spec.queries,
                     value_reduction=head_spec.value_reduction)
  return linear(rng, width, num_classes)


def attentive_params(width: int, num_classes: int, queries: int, value_reduction: int) -> int:
  """The paper's count: M·d (queries) + d·d' (W_v) + d'·K + K (the linear head)."""
  narrow = value_width(width, queries, value_reduction)
  return queries * width + width * narrow + narrow * num_classes + num_classes


def attentive_pool(head, tokens, mask=None):
  """Efficient probing's pooled features o [B, d'] of token states [B, N, d]; `mask` [B, N]
  (1 for a token, 0 for padding; default: every token) keeps padding out of the softmax."""
  queries, value = head['queries'], head['value']
  m, d = queries.shape
  if tokens.ndim != 3 or tokens.shape[-1] != d:
    raise ValueError(f'efficient probing with queries of width {d} needs token states '
                     f'[batch, tokens, {d}], got shape {tuple(tokens.shape)}')
  x = tokens.astype(jnp.promote_types(tokens.dtype, jnp.float32))
  scores = jnp.einsum('md,bnd->bmn', queries, x) / math.sqrt(d)
  if mask is not None:
    # the lowest finite score, not -inf: a row of padding alone (weight 0) stays finite
    scores = jnp.where(mask[:, None, :] > 0, scores, jnp.finfo(scores.dtype).min)
  weights = jax.nn.softmax(scores, axis=-1)  # over tokens
  v = (x @ value).reshape(*x.shape[:2], m, -1)  # [B, N, M, d'/M]: group m for query m
  return jnp.einsum('bmn,bnmc->bmc', weights, v).reshape(x.shape[0], -1)
