"""A Flax Linen BERT encoder with HF `BertModel` semantics.

Every linear layer goes through `peftjax.core.leaves.dense`, so a param tree whose kernels
are structured leaves (e.g. `LowRank`) runs unchanged. Param paths (slash-joined):

  embeddings/{word,position,token_type}/embedding, embeddings/norm/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}
  encoder/layer_{i}/attention_norm/{scale,bias}
  encoder/layer_{i}/{intermediate,output}/{kernel,bias}
  encoder/layer_{i}/output_norm/{scale,bias}

`PARAM_AXES` names each param's axes logically, for sharding rules (`peftjax.parallel`).
Compute runs in the dtype of the params it is given (bf16 params: bf16 matmuls), with
LayerNorm statistics, attention softmax and pooling in float32. `Bert(remat=True)` recomputes
each block's activations in the backward pass instead of storing them; without it, the
LayerNorms and the GELU still keep only their inputs for the backward pass (`LayerNorm`,
`gelu`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.core import leaves
from peftjax.core.dropout import dropout
from peftjax.parallel.sharding import axes_from_table

_INIT = nn.initializers.normal(stddev=0.02)

PARAM_AXES = (
    (r'embeddings/word/embedding$', ('vocab', 'embed')),
    (r'embeddings/(position|token_type)/embedding$', ('position', 'embed')),
    (r'norm/(scale|bias)$', ('norm',)),
    (r'attention/(query|key|value)/kernel$', ('embed', 'heads')),
    (r'attention/(query|key|value)/bias$', ('heads',)),
    (r'attention/output/kernel$', ('heads', 'embed')),
    (r'intermediate/kernel$', ('embed', 'mlp')),
    (r'intermediate/bias$', ('mlp',)),
    (r'layer_\d+/output/kernel$', ('mlp', 'embed')),
    (r'output/bias$', ('embed',)),
)


# For its backward pass a plain LayerNorm keeps x - mean besides its input x, and the exact
# GELU its erfc and exp terms besides x (arrays of x's size). These keep x alone and recompute
# the rest there (`jax.checkpoint`): less activation memory for a few elementwise passes
# (docs/sparse_methods.md, "S²FT's memory").
LayerNorm = nn.remat(nn.LayerNorm)
gelu = jax.checkpoint(functools.partial(jax.nn.gelu, approximate=False))


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape and regularisation hyper-parameters of a BERT encoder."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by '
                       f'num_heads {self.num_heads}')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> BertConfig:
    """Builds a config from a HF `config.json` dict; rejects variants this model lacks."""
    act = config.get('hidden_act', 'gelu')
    if act != 'gelu':
      raise ValueError(f'unsupported hidden_act {act!r}: only exact (erf) "gelu" is implemented')
    pos = config.get('position_embedding_type', 'absolute')
    if pos != 'absolute':
      raise ValueError(f'unsupported position_embedding_type {pos!r}: only "absolute"')
    return cls(
        vocab_size=int(config['vocab_size']),
        hidden_size=int(config['hidden_size']),
        num_layers=int(config['num_hidden_layers']),
        num_heads=int(config['num_attention_heads']),
        intermediate_size=int(config['intermediate_size']),
        max_position_embeddings=int(config.get('max_position_embeddings', 512)),
        type_vocab_size=int(config.get('type_vocab_size', 2)),
        layer_norm_eps=float(config.get('layer_norm_eps', 1e-12)),
        hidden_dropout=float(config.get('hidden_dropout_prob', 0.1)),
        attention_dropout=float(config.get('attention_probs_dropout_prob', 0.1)),
    )


class Dense(nn.Module):
  """A linear layer computed by `leaves.dense`; in training it passes a dropout rng along."""
  features: int
  use_bias: bool = True
  handles_structured = True  # see peftjax.core.linen

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    kernel = self.param('kernel', _INIT, (x.shape[-1], self.features))
    rng = self.make_rng('dropout') if train else None
    y = leaves.dense(x, kernel, rng)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
      y = y + jnp.asarray(bias, y.dtype)
    return y


class Dropout(nn.Module):
  """Inverted dropout with `peftjax.core.dropout` (a fast hash mask), active when `train`."""
  rate: float

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if not train or self.rate == 0.0:
      return x
    return dropout(self.make_rng('dropout'), x, self.rate)


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm and dropout."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, *, train: bool = False):
    cfg = self.config
    positions = jnp.arange(input_ids.shape[-1])[None, :]
    x = (nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_INIT, name='word')(input_ids)
         + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=_INIT,
                    name='position')(positions)
         + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=_INIT,
                    name='token_type')(token_type_ids))
    x = LayerNorm(epsilon=cfg.layer_norm_eps, name='norm')(x)
    return Dropout(cfg.hidden_dropout)(x, train=train)


class SelfAttention(nn.Module):
  """Multi-head self-attention with an additive key mask and the output projection."""
  config: BertConfig

  @nn.compact
  def __call__(self, x, attention_mask, *, train: bool = False):
    cfg = self.config
    b, l, _ = x.shape

    def heads(name):
      y = Dense(cfg.hidden_size, name=name)(x, train=train)
      return y.reshape(b, l, cfg.num_heads, cfg.head_dim).transpose(0, 2, 1, 3)

    q, k, v = heads('query'), heads('key'), heads('value')
    scores = (q @ k.transpose(0, 1, 3, 2)) / jnp.asarray(math.sqrt(cfg.head_dim), q.dtype)
    scores = scores.astype(jnp.float32)
    mask = attention_mask[:, None, None, :].astype(jnp.float32)
    scores = scores + (1.0 - mask) * jnp.finfo(jnp.float32).min
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    probs = Dropout(cfg.attention_dropout)(probs, train=train)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, l, cfg.hidden_size)
    return Dense(cfg.hidden_size, name='output')(ctx, train=train)


class Layer(nn.Module):
  """One post-LayerNorm transformer block."""
  config: BertConfig

  @nn.compact
  def __call__(self, x, attention_mask, train: bool = False):
    cfg = self.config
    drop = Dropout(cfg.hidden_dropout)
    h = SelfAttention(cfg, name='attention')(x, attention_mask, train=train)
    h = drop(h, train=train)
    x = LayerNorm(epsilon=cfg.layer_norm_eps, name='attention_norm')(x + h)
    h = Dense(cfg.intermediate_size, name='intermediate')(x, train=train)
    h = gelu(h)
    h = Dense(cfg.hidden_size, name='output')(h, train=train)
    h = drop(h, train=train)
    return LayerNorm(epsilon=cfg.layer_norm_eps, name='output_norm')(x + h)


class Encoder(nn.Module):
  """The stack of `num_layers` blocks, named `layer_{i}` (rematerialised with `remat`)."""
  config: BertConfig
  remat: bool = False

  @nn.compact
  def __call__(self, x, attention_mask, *, train: bool = False):
    block = nn.remat(Layer, static_argnums=(3,)) if self.remat else Layer
    for i in range(self.config.num_layers):
      x = block(self.config, name=f'layer_{i}')(x, attention_mask, train)
    return x


class Bert(nn.Module):
  """BERT encoder returning the last hidden states [B, L, H] (no pooler).

  Dropout (hidden, attention-prob and adapter dropout) is active only with `train=True`,
  which needs a 'dropout' rng. `remat` recomputes each block in the backward pass.
  """
  config: BertConfig
  remat: bool = False

  logical_axes = staticmethod(axes_from_table(PARAM_AXES))

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = Embeddings(self.config, name='embeddings')(input_ids, token_type_ids, train=train)
    return Encoder(self.config, self.remat, name='encoder')(x, attention_mask, train=train)


def mean_pool(hidden, attention_mask):
  """Mean of `hidden` [B, L, H] over non-pad tokens (sentence-transformers semantics), in
  float32 or wider."""
  hidden = hidden.astype(jnp.promote_types(hidden.dtype, jnp.float32))
  mask = attention_mask.astype(hidden.dtype)[..., None]
  total = jnp.sum(hidden * mask, axis=-2)
  count = jnp.maximum(jnp.sum(mask, axis=-2), jnp.asarray(1e-9, hidden.dtype))
  return total / count
