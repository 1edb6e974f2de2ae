"""Attention masks and dot-product attention shared by the bundled sequence models.

Rows may pack several examples: `segment_ids` [B, L] number them (0 = padding) and no token
attends across segments. A prefix LM attends bidirectionally inside its prefix (`prefix`
[B, L] bool) and causally after it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def make_mask(segment_ids, *, causal: bool, prefix=None, kv_segment_ids=None):
  """[B, 1, Lq, Lk] bool: query i may attend key j.

  Keys and queries must share a non-zero segment (`kv_segment_ids` for cross-attention,
  default: self-attention). `causal`: also j <= i, unless both i and j are in `prefix`.
  """
  kv = segment_ids if kv_segment_ids is None else kv_segment_ids
  allowed = (segment_ids[:, :, None] == kv[:, None, :]) & (segment_ids[:, :, None] > 0)
  if causal:
    lq, lk = segment_ids.shape[1], kv.shape[1]
    ordered = jnp.arange(lq)[:, None] >= jnp.arange(lk)[None, :]
    if prefix is not None:
      ordered = ordered | (prefix[:, :, None] & prefix[:, None, :])
    allowed = allowed & ordered
  return allowed[:, None]


def attend(q, k, v, mask, *, bias=None, scale: float | None = None):
  """Softmax attention of q [B, Lq, H, D] over k, v [B, Lk, Hkv, D] (grouped-query when
  Hkv < H: query head h reads key head h // (H // Hkv)), `mask` [B, 1|H, Lq, Lk] bool and an
  optional additive `bias` [1|B, H, Lq, Lk]; `scale` defaults to 1/sqrt(D). Logits and softmax
  in float32; rows with no allowed key give zeros. Returns [B, Lq, H, D]."""
  b, lq, h, d = q.shape
  hkv = k.shape[2]
  if h % hkv:
    raise ValueError(f'{h} query heads cannot share {hkv} key/value heads')
  scale = d ** -0.5 if scale is None else scale
  q = q.reshape(b, lq, hkv, h // hkv, d)
  logits = jnp.einsum('bqkgd,bskd->bkgqs', q, k).astype(jnp.float32) * scale
  logits = logits.reshape(b, h, lq, -1)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1) * jnp.any(mask, axis=-1, keepdims=True)
  probs = probs.astype(v.dtype).reshape(b, hkv, h // hkv, lq, -1)
  return jnp.einsum('bkgqs,bskd->bqkgd', probs, v).reshape(b, lq, h, d)
