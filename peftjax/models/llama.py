"""A Flax Linen LLaMA causal decoder with HF `LlamaForCausalLM` semantics.

LLaMA (Touvron et al., 2023, arXiv:2302.13971): pre-RMSNorm blocks, rotary position
embeddings (RoPE, Su et al., arXiv:2104.09864) in HF's `rotate_half` layout, SwiGLU MLPs
(Shazeer, arXiv:2002.05202) and grouped-query attention (Ainslie et al., arXiv:2305.13245).

Built only from stock `flax.linen` layers (`nn.Embed`, `nn.Dense`, `nn.RMSNorm`), so
structured leaves (LoRA) compute through `peftjax.core.linen`. Param paths mirror HF module
names, so HF PEFT `target_modules` map one to one:

  embed_tokens/embedding, norm/scale, lm_head/kernel (only when untied)
  layers_{i}/self_attn/{q_proj,k_proj,v_proj,o_proj}/kernel
  layers_{i}/mlp/{gate_proj,up_proj,down_proj}/kernel
  layers_{i}/{input_layernorm,post_attention_layernorm}/scale

Rows may pack several examples (`segment_ids`, 0 = padding; `positions` restart per
example) and a prefix LM attends bidirectionally inside `prefix` (`peftjax.models.attention`).
A KV cache (`init_cache`) makes decoding incremental; `peftjax.models.decode.generate` uses it.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.core import leaves
from peftjax.models.attention import attend, make_mask
from peftjax.parallel.sharding import axes_from_table

_INIT = nn.initializers.normal(stddev=0.02)  # HF `initializer_range`

PARAM_AXES = (
    (r'embed_tokens/embedding$', ('vocab', 'embed')),
    (r'lm_head/kernel$', ('embed', 'vocab')),
    (r'norm/scale$', ('norm',)),
    (r'self_attn/(q_proj|k_proj|v_proj)/kernel$', ('embed', 'heads')),
    (r'self_attn/o_proj/kernel$', ('heads', 'embed')),
    (r'mlp/(gate_proj|up_proj)/kernel$', ('embed', 'mlp')),
    (r'mlp/down_proj/kernel$', ('mlp', 'embed')),
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape hyper-parameters of a LLaMA decoder (HF `LlamaConfig` names in comments)."""
  vocab_size: int
  hidden_size: int
  num_layers: int         # num_hidden_layers
  num_heads: int          # num_attention_heads
  num_kv_heads: int       # num_key_value_heads
  intermediate_size: int
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5   # rms_norm_eps
  tie_embeddings: bool = True  # tie_word_embeddings
  max_length: int = 2048  # max_position_embeddings: the longest sequence `generate` makes

  def __post_init__(self):
    if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
      raise ValueError(f'expected hidden_size divisible by num_heads and num_heads by '
                       f'num_kv_heads; got hidden_size={self.hidden_size}, num_heads='
                       f'{self.num_heads}, num_kv_heads={self.num_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'rotary embeddings need an even head_dim, got {self.head_dim}')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def rope(x, positions, theta: float):
  """Rotary embedding of x [B, L, H, D] at `positions` [B, L], HF `rotate_half` layout: dim i
  pairs with dim i + D/2 at frequency theta^(-2i/D). Angles in float32."""
  d = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
  """An empty KV cache of `length` slots: keys and values of every layer, each slot's
  segment id (0 = empty) and prefix flag, and `index`, the next slot to write. Size it for the
  whole sequence: a write past the end is clamped (XLA's dynamic_update_slice), not an error."""
  shape = (batch, length, config.num_kv_heads, config.head_dim)
  cache = {'index': jnp.zeros((), jnp.int32),
           'segment_ids': jnp.zeros((batch, length), jnp.int32),
           'prefix': jnp.zeros((batch, length), bool)}
  for i in range(config.num_layers):
    cache[f'layers_{i}'] = {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
  return cache


def _cached_mask(cache: dict, segment_ids, prefix):
  """Writes the chunk's segment ids and prefix flags at `cache['index']`; returns the updated
  cache and the [B, 1, L, S] mask of the chunk's queries over every cache slot."""
  index, length = cache['index'], segment_ids.shape[1]
  slots = cache['segment_ids'].shape[1]
  prefix = jnp.zeros(segment_ids.shape, bool) if prefix is None else prefix.astype(bool)
  kv_segments = jax.lax.dynamic_update_slice(
      cache['segment_ids'], segment_ids.astype(jnp.int32), (0, index))
  kv_prefix = jax.lax.dynamic_update_slice(cache['prefix'], prefix, (0, index))
  # Causal order by cache slot: query t of the chunk sits in slot index + t.
  ordered = (index + jnp.arange(length))[:, None] >= jnp.arange(slots)[None, :]
  ordered = ordered[None] | (prefix[:, :, None] & kv_prefix[:, None, :])
  mask = make_mask(segment_ids, causal=False, kv_segment_ids=kv_segments) & ordered[:, None]
  cache = {**cache, 'index': index + length, 'segment_ids': kv_segments, 'prefix': kv_prefix}
  return cache, mask


def _dense(features: int, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, kernel_init=_INIT, name=name)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE; writes its keys and values into `cache`."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, mask, positions, cache=None, index=0):
    cfg = self.config
    b, l, _ = x.shape

    def project(name, heads):
      return _dense(heads * cfg.head_dim, name)(x).reshape(b, l, heads, cfg.head_dim)

    q = rope(project('q_proj', cfg.num_heads), positions, cfg.rope_theta)
    k = rope(project('k_proj', cfg.num_kv_heads), positions, cfg.rope_theta)
    v = project('v_proj', cfg.num_kv_heads)
    if cache is not None:
      k = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), (0, index, 0, 0))
      cache = {'k': k, 'v': v}
    y = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    return _dense(cfg.hidden_size, 'o_proj')(y.reshape(b, l, -1)), cache


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    gate = _dense(cfg.intermediate_size, 'gate_proj')(x)
    up = _dense(cfg.intermediate_size, 'up_proj')(x)
    return _dense(cfg.hidden_size, 'down_proj')(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """One pre-RMSNorm block: x + attn(norm(x)), then x + mlp(norm(x))."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, mask, positions, cache=None, index=0):
    cfg = self.config
    h = nn.RMSNorm(cfg.rms_eps, name='input_layernorm')(x)
    h, cache = Attention(cfg, name='self_attn')(h, mask, positions, cache, index)
    x = x + h
    h = nn.RMSNorm(cfg.rms_eps, name='post_attention_layernorm')(x)
    return x + Mlp(cfg, name='mlp')(h), cache


class Llama(nn.Module):
  """LLaMA decoder returning next-token logits [B, L, vocab].

  Call: `(input_ids [B, L], *, segment_ids=None, positions=None, prefix=None, cache=None,
  train=False)`. Defaults: one segment per row, positions `arange(L)` (from the cache index
  with a cache), causal attention. Attention never crosses segments; RoPE is relative, so
  packed rows are exact up to rounding even with the default positions. `prefix` [B, L] bool
  makes attention bidirectional among prefix tokens. With `cache` (`init_cache`) the call
  writes its keys/values at the cache index and returns `(logits, cache)`. LLaMA has no
  dropout: `train` only keeps the trainer's call convention (adapter dropout follows the
  'dropout' rng). `remat` recomputes each block in the backward pass.
  """
  config: LlamaConfig
  remat: bool = False

  logical_axes = staticmethod(axes_from_table(PARAM_AXES))

  @nn.compact
  def __call__(self, input_ids, *, segment_ids=None, positions=None, prefix=None, cache=None,
               train: bool = False):
    del train
    cfg = self.config
    b, l = input_ids.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, l), jnp.int32)
    if cache is None:
      index = 0
      mask = make_mask(segment_ids, causal=True, prefix=prefix)
    else:
      index = cache['index']
      cache, mask = _cached_mask(cache, segment_ids, prefix)
    if positions is None:
      positions = jnp.broadcast_to(index + jnp.arange(l), (b, l))
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_INIT,
                     name='embed_tokens')
    x = embed(input_ids)
    block = nn.remat(DecoderLayer) if self.remat else DecoderLayer
    for i in range(cfg.num_layers):
      name = f'layers_{i}'
      x, layer_cache = block(cfg, name=name)(x, mask, positions,
                                             None if cache is None else cache[name], index)
      if cache is not None:
        cache = {**cache, name: layer_cache}
    x = nn.RMSNorm(cfg.rms_eps, name='norm')(x)
    logits = self._head(embed, x)
    return logits if cache is None else (logits, cache)

  def _head(self, embed: nn.Embed, x):
    cfg = self.config
    if not cfg.tie_embeddings:
      return nn.Dense(cfg.vocab_size, use_bias=False, kernel_init=_INIT, name='lm_head')(x)
    table = embed.variables['params']['embedding']
    if leaves.is_structured(table):
      raise TypeError(
          f'embed_tokens/embedding is a structured leaf ({type(table).__name__}) but the '
          'model ties it to the output head (tie_embeddings=True); an adapter on the tied '
          'embedding is not supported: leave embed_tokens out of the targets, or run the '
          'merged tree (pj.merge)')
    return embed.attend(x)
