"""A T5 encoder-decoder in Flax Linen, from stock `flax.linen` layers.

Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (arXiv 1910.10683), with the T5.1.1 changes as options: gated-GELU feed-forward
(`feed_forward='gated-gelu'`; the original: 'relu') and an untied `lm_head`
(`tie_embeddings=True`: the original, logits from the input embedding times d_model**-0.5).
Pre-norm blocks with T5's RMS LayerNorm (no mean, no bias), no biases, no 1/sqrt(d) on
attention logits (T5 folds it into the query init; all inits are T5's), and one relative
position bias table per stack, shared by its layers: bidirectional buckets in the encoder,
causal in the decoder, computed from the given positions.

Rows may pack several examples: segment ids [B, L] number them (0 = padding) and attention
never crosses segments (encoder self, causal decoder self, cross). Param paths:
`token_embedder/embedding` (shared by both stacks), `{encoder,decoder}/relative_bias/embedding`
[buckets, heads], `{encoder,decoder}/layer_{i}/{attention,cross_attention (decoder),mlp}_norm/
scale`, `.../{attention,cross_attention}/{query,key,value,output}/kernel`,
`.../mlp/{wi_0,wi_1 (gated) | wi,wo}/kernel`, `{encoder,decoder}/final_norm/scale` and
`lm_head/kernel` (untied).

Dropout (rate `dropout`) acts on the embeddings, each sub-block's output, the feed-forward
hidden layer and each stack's output, with `train=True` only (a 'dropout' rng); T5.1.1
pre-trains with `dropout=0.0`. `generate`: greedy decoding with a KV cache.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.core.linen import structured_layers
from peftjax.models import Model
from peftjax.models.attention import attend, make_mask
from peftjax.models.bert import Dropout
from peftjax.parallel.sharding import axes_from_table

FEED_FORWARD = ('gated-gelu', 'relu')

# Sizes for pre-training on a CPU (T5.1.1, vocab 8192). An Adam step on a batch of 32 x (128
# inputs, 64 targets) on 2 shared cores (~45 GFLOP/s in a 4096x256x1024 matmul): SMALL_CPU
# 13.6M params, 213 GFLOP (XLA's count), 7.0 s; TINY_CPU 4.5M params, 63 GFLOP, 1.5-2.9 s.
SMALL_CPU = {'name': 't5', 'vocab_size': 8192, 'd_model': 256, 'num_heads': 4, 'head_dim': 64,
             'd_ff': 1024, 'encoder_layers': 4, 'decoder_layers': 4}
TINY_CPU = {**SMALL_CPU, 'd_model': 128, 'head_dim': 32, 'd_ff': 512}

PARAM_AXES = (
    (r'token_embedder/embedding$', ('vocab', 'embed')),
    (r'relative_bias/embedding$', (None, 'heads')),  # the bucket axis is never sharded
    (r'norm/scale$', ('norm',)),
    (r'attention/(query|key|value)/kernel$', ('embed', 'heads')),
    (r'attention/output/kernel$', ('heads', 'embed')),
    (r'mlp/wi(_0|_1)?/kernel$', ('embed', 'mlp')),
    (r'mlp/wo/kernel$', ('mlp', 'embed')),
    (r'lm_head/kernel$', ('embed', 'vocab')),
)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Sizes and options of a T5 encoder-decoder."""
  vocab_size: int
  d_model: int
  num_heads: int
  head_dim: int
  d_ff: int
  encoder_layers: int
  decoder_layers: int
  relative_buckets: int = 32
  relative_max_distance: int = 128
  feed_forward: str = 'gated-gelu'
  tie_embeddings: bool = False
  dropout: float = 0.1
  rms_eps: float = 1e-6

  def __post_init__(self):
    if self.feed_forward not in FEED_FORWARD:
      raise ValueError(f'feed_forward {self.feed_forward!r}; expected one of {FEED_FORWARD}')
    if self.relative_buckets < 4 or self.relative_buckets % 4:
      raise ValueError(f'relative_buckets {self.relative_buckets}: expected a multiple of 4 '
                       '(half per direction, half of those exact)')
    if self.relative_max_distance <= self.relative_buckets // 2:
      raise ValueError(f'relative_max_distance {self.relative_max_distance} must exceed '
                       f'relative_buckets // 2 = {self.relative_buckets // 2}')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'dropout {self.dropout}: expected a rate in [0, 1)')


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int,
                             max_distance: int):
  """T5's bucket of `relative_position` = key position - query position (Mesh TF
  `_relative_position_bucket`). Half the buckets (per direction, when `bidirectional`; keys
  after the query take the upper half) hold exact distances, the rest log-spaced distances up
  to `max_distance`, beyond which all share the last bucket. Causal: keys after the query
  fall in bucket 0 (they are masked anyway)."""
  n = -jnp.asarray(relative_position, jnp.int32)
  ret = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret = (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  exact = num_buckets // 2
  ratio = jnp.maximum(n, exact).astype(jnp.float32) / exact  # >= 1: no log(0)
  large = exact + (jnp.log(ratio) / math.log(max_distance / exact)
                   * (num_buckets - exact)).astype(jnp.int32)
  return ret + jnp.where(n < exact, n, jnp.minimum(large, num_buckets - 1))


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


def _relative_bias(cfg: T5Config, bidirectional: bool, q_positions, k_positions):
  """[1|B, H, Lq, Lk] additive bias from a stack's table (defined in the caller's scope)."""
  buckets = relative_position_bucket(
      k_positions[:, None, :] - q_positions[:, :, None], bidirectional=bidirectional,
      num_buckets=cfg.relative_buckets, max_distance=cfg.relative_max_distance)
  table = nn.Embed(cfg.relative_buckets, cfg.num_heads, embedding_init=_normal(
      cfg.d_model ** -0.5), name='relative_bias')
  return table(buckets).transpose(0, 3, 1, 2)


class Attention(nn.Module):
  """Multi-head attention without logit scaling. `cached=(index, length)` decodes one token:
  self-attention writes its key/value at `index` of a 'cache' of `length`; cross-attention
  projects the encoder states once and reuses them."""
  config: T5Config
  cross: bool = False

  @nn.compact
  def __call__(self, x, kv, mask, bias=None, *, cached=None):
    cfg = self.config
    inner = cfg.num_heads * cfg.head_dim

    def project(name, inputs, std):
      y = nn.Dense(inner, use_bias=False, kernel_init=_normal(std), name=name)(inputs)
      return y.reshape(*inputs.shape[:2], cfg.num_heads, cfg.head_dim)

    def keys_values():
      return (project('key', kv, cfg.d_model ** -0.5),
              project('value', kv, cfg.d_model ** -0.5))

    q = project('query', x, (cfg.d_model * cfg.head_dim) ** -0.5)
    if cached is None:
      k, v = keys_values()
    elif self.cross:  # the first call projects the encoder states; later ones reuse them
      if not self.has_variable('cache', 'cached_key'):
        for name, y in zip(('cached_key', 'cached_value'), keys_values()):
          self.put_variable('cache', name, y)
      k, v = self.get_variable('cache', 'cached_key'), self.get_variable('cache', 'cached_value')
    else:
      index, length = cached
      k, v = keys_values()
      shape = (k.shape[0], length) + k.shape[2:]
      ck = self.variable('cache', 'cached_key', jnp.zeros, shape, k.dtype)
      cv = self.variable('cache', 'cached_value', jnp.zeros, shape, v.dtype)
      ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, index, 0, 0))
      cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, index, 0, 0))
      k, v = ck.value, cv.value
    out = attend(q, k, v, mask, bias=bias, scale=1.0)
    out = out.reshape(*out.shape[:2], inner)
    return nn.Dense(cfg.d_model, use_bias=False, kernel_init=_normal(inner ** -0.5),
                    name='output')(out)


class MLP(nn.Module):
  """T5.1.1's gated-GELU (tanh approximation) or the original ReLU feed-forward."""
  config: T5Config

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    cfg = self.config

    def dense(features, name, std):
      return nn.Dense(features, use_bias=False, kernel_init=_normal(std), name=name)

    if cfg.feed_forward == 'gated-gelu':
      h = (jax.nn.gelu(dense(cfg.d_ff, 'wi_0', cfg.d_model ** -0.5)(x), approximate=True)
           * dense(cfg.d_ff, 'wi_1', cfg.d_model ** -0.5)(x))
    else:
      h = jax.nn.relu(dense(cfg.d_ff, 'wi', cfg.d_model ** -0.5)(x))
    h = Dropout(cfg.dropout)(h, train=train)
    return dense(cfg.d_model, 'wo', cfg.d_ff ** -0.5)(h)


def _norm(cfg: T5Config, name: str):
  return nn.RMSNorm(epsilon=cfg.rms_eps, name=name)


class EncoderLayer(nn.Module):
  """Pre-norm self-attention and feed-forward, each added to the residual stream."""
  config: T5Config

  @nn.compact
  def __call__(self, x, mask, bias, train: bool = False):
    cfg, drop = self.config, Dropout(self.config.dropout)
    h = _norm(cfg, 'attention_norm')(x)
    x = x + drop(Attention(cfg, name='attention')(h, h, mask, bias), train=train)
    h = _norm(cfg, 'mlp_norm')(x)
    return x + drop(MLP(cfg, name='mlp')(h, train=train), train=train)


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention, cross-attention and feed-forward."""
  config: T5Config

  @nn.compact
  def __call__(self, x, encoded, self_mask, cross_mask, bias, train: bool = False,
               cached=None):
    cfg, drop = self.config, Dropout(self.config.dropout)
    h = _norm(cfg, 'attention_norm')(x)
    x = x + drop(Attention(cfg, name='attention')(h, h, self_mask, bias, cached=cached),
                 train=train)
    h = _norm(cfg, 'cross_attention_norm')(x)
    x = x + drop(Attention(cfg, cross=True, name='cross_attention')(
        h, encoded, cross_mask, cached=cached), train=train)
    h = _norm(cfg, 'mlp_norm')(x)
    return x + drop(MLP(cfg, name='mlp')(h, train=train), train=train)


class Encoder(nn.Module):
  """The encoder stack on embedded inputs [B, L, d_model]."""
  config: T5Config
  remat: bool = False

  @nn.compact
  def __call__(self, x, segment_ids, positions=None, *, train: bool = False):
    cfg = self.config
    positions = jnp.arange(x.shape[1])[None] if positions is None else positions
    bias = _relative_bias(cfg, True, positions, positions)
    mask = make_mask(segment_ids, causal=False)
    x = Dropout(cfg.dropout)(x, train=train)
    block = nn.remat(EncoderLayer, static_argnums=(4,)) if self.remat else EncoderLayer
    for i in range(cfg.encoder_layers):
      x = block(cfg, name=f'layer_{i}')(x, mask, bias, train)
    return Dropout(cfg.dropout)(_norm(cfg, 'final_norm')(x), train=train)


class Decoder(nn.Module):
  """The decoder stack on embedded inputs [B, L, d_model] and the encoder states. With
  `cache_length`, one token per row per call at the position held in the 'cache'."""
  config: T5Config
  remat: bool = False

  @nn.compact
  def __call__(self, x, encoded, segment_ids, encoder_segment_ids, positions=None, *,
               train: bool = False, cache_length: int | None = None):
    cfg = self.config
    if cache_length is None:
      positions = jnp.arange(x.shape[1])[None] if positions is None else positions
      bias = _relative_bias(cfg, False, positions, positions)
      self_mask = make_mask(segment_ids, causal=True)
      cross_mask = make_mask(segment_ids, causal=False, kv_segment_ids=encoder_segment_ids)
      cached = None
    else:
      counter = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
      index = counter.value
      counter.value = index + 1
      keys = jnp.arange(cache_length)[None]
      bias = _relative_bias(cfg, False, index.reshape(1, 1), keys)
      self_mask = (keys <= index)[:, None, None, :]
      cross_mask = make_mask(segment_ids, causal=False,
                             kv_segment_ids=(encoder_segment_ids > 0).astype(jnp.int32))
      cached = (index, cache_length)
    x = Dropout(cfg.dropout)(x, train=train)
    remat = self.remat and cached is None
    block = nn.remat(DecoderLayer, static_argnums=(6,)) if remat else DecoderLayer
    for i in range(cfg.decoder_layers):
      x = block(cfg, name=f'layer_{i}')(x, encoded, self_mask, cross_mask, bias, train, cached)
    return Dropout(cfg.dropout)(_norm(cfg, 'final_norm')(x), train=train)


def _embedder(cfg: T5Config):
  return nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_normal(1.0))


def _segments(ids, segment_ids):
  return jnp.ones(ids.shape, jnp.int32) if segment_ids is None else segment_ids


class T5(nn.Module):
  """T5 encoder-decoder returning logits [B, Ld, vocab]; `encode` and `decode` run the two
  halves (`module.apply(..., method=T5.encode)`). Segment ids default to one example per
  row without padding; positions to 0, 1, ... along the row. `remat` recomputes each block
  in the backward pass."""
  config: T5Config
  remat: bool = False

  logical_axes = staticmethod(axes_from_table(PARAM_AXES))

  def setup(self):
    cfg = self.config
    self.token_embedder = _embedder(cfg)
    self.encoder = Encoder(cfg, self.remat)
    self.decoder = Decoder(cfg, self.remat)
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False,
                              kernel_init=_normal(cfg.d_model ** -0.5))

  def __call__(self, encoder_ids, decoder_input_ids, *, encoder_segment_ids=None,
               decoder_segment_ids=None, encoder_positions=None, decoder_positions=None,
               train: bool = False):
    encoded = self.encode(encoder_ids, encoder_segment_ids=encoder_segment_ids,
                          encoder_positions=encoder_positions, train=train)
    return self.decode(encoded, decoder_input_ids,
                       encoder_segment_ids=_segments(encoder_ids, encoder_segment_ids),
                       decoder_segment_ids=decoder_segment_ids,
                       decoder_positions=decoder_positions, train=train)

  def encode(self, encoder_ids, *, encoder_segment_ids=None, encoder_positions=None,
             train: bool = False):
    """Encoder states [B, Le, d_model]."""
    return self.encoder(self.token_embedder(encoder_ids),
                        _segments(encoder_ids, encoder_segment_ids), encoder_positions,
                        train=train)

  def decode(self, encoded, decoder_input_ids, *, encoder_segment_ids=None,
             decoder_segment_ids=None, decoder_positions=None, train: bool = False,
             cache_length: int | None = None):
    """Logits [B, Ld, vocab] given the encoder states. With `cache_length` (apply with
    `mutable=['cache']`): one token per row per call, positions 0, 1, ... kept in the cache,
    one example per row (`encoder_segment_ids` > 0 marks its tokens)."""
    if cache_length is not None and (decoder_input_ids.shape[1] != 1 or decoder_segment_ids
                                     is not None or decoder_positions is not None):
      raise ValueError('cached decoding takes one token per row and no decoder segment ids '
                       f'or positions; got decoder_input_ids of shape '
                       f'{decoder_input_ids.shape}')
    x = self.decoder(self.token_embedder(decoder_input_ids), encoded,
                     _segments(decoder_input_ids, decoder_segment_ids),
                     _segments(encoded[..., 0], encoder_segment_ids), decoder_positions,
                     train=train, cache_length=cache_length)
    if self.config.tie_embeddings:
      return self.token_embedder.attend(x * self.config.d_model ** -0.5)
    return self.lm_head(x)


class T5Encoder(nn.Module):
  """T5's encoder called like `Bert`: `(input_ids, attention_mask, train=)` -> states
  [B, L, d_model]. Its params are a T5 tree's `token_embedder` and `encoder` (see
  `encoder_model`), so a classifier can start from a pre-trained T5."""
  config: T5Config
  remat: bool = False

  logical_axes = staticmethod(axes_from_table(PARAM_AXES))

  def setup(self):
    self.token_embedder = _embedder(self.config)
    self.encoder = Encoder(self.config, self.remat)

  def __call__(self, input_ids, attention_mask, *, train: bool = False):
    return self.encoder(self.token_embedder(input_ids), attention_mask.astype(jnp.int32),
                        train=train)


def encoder_model(model: Model) -> Model:
  """The encoder half of a T5 `Model` as a `T5Encoder` model on the same params."""
  if not isinstance(model.module, T5):
    raise TypeError(f'encoder_model expects a Model of T5; got {type(model.module).__name__}')
  module = T5Encoder(model.module.config, model.module.remat)
  params = {k: model.params[k] for k in ('token_embedder', 'encoder')}
  return Model(module, params, f'{model.model_id}/encoder', module.logical_axes)


def init(config: T5Config, seed: int = 0, *, remat: bool = False) -> Model:
  """A randomly initialised T5 `Model` (T5's init scales)."""
  module = T5(config, remat)
  return Model(module, _init(T5(config), jax.random.key(seed)), f't5-random-seed{seed}',
               module.logical_axes)


@functools.partial(jax.jit, static_argnums=0)
def _init(module: T5, rng):
  ids = jnp.ones((1, 4), jnp.int32)
  return module.init(rng, ids, ids)['params']


@functools.partial(jax.jit, static_argnames=('module', 'max_length', 'start_id', 'eos_id',
                                             'pad_id', 'return_logits'))
def generate(module: T5, params, encoder_ids, *, max_length: int, encoder_segment_ids=None,
             start_id: int = 0, eos_id: int | None = 1, pad_id: int = 0,
             return_logits: bool = False):
  """Greedy decoding with a KV cache, one example per row (`encoder_segment_ids` > 0 marks
  its tokens; default: all). `params` may hold structured leaves (an adapter's `apply`).

  Returns tokens [B, max_length] after the start token, `pad_id` after each row's `eos_id`
  (None: no end token); it stops early once every row has ended. With `return_logits`, also
  the float32 logits [B, max_length, vocab] of each step (zeros after the stop)."""
  if max_length < 1:
    raise ValueError(f'max_length {max_length}: expected at least 1')
  batch = encoder_ids.shape[0]
  segments = _segments(encoder_ids, encoder_segment_ids)
  with structured_layers():
    encoded = module.apply({'params': params}, encoder_ids, encoder_segment_ids=segments,
                           method=T5.encode)

    def step(token, cache):
      variables = {'params': params} if cache is None else {'params': params, 'cache': cache}
      logits, state = module.apply(variables, encoded, token[:, None],
                                   encoder_segment_ids=segments, cache_length=max_length,
                                   method=T5.decode, mutable=['cache'])
      return logits[:, 0].astype(jnp.float32), state['cache']

    def record(i, logits, done, cache, tokens, scores):
      token = jnp.where(done, pad_id, jnp.argmax(logits, -1).astype(jnp.int32))
      done = done if eos_id is None else done | (token == eos_id)
      scores = scores.at[:, i].set(logits) if return_logits else scores
      return i + 1, done, cache, tokens.at[:, i].set(token), scores

    def body(carry):
      i, done, cache, tokens, scores = carry
      logits, cache = step(tokens[:, i - 1], cache)
      return record(i, logits, done, cache, tokens, scores)

    logits, cache = step(jnp.full((batch,), start_id, jnp.int32), None)
    scores = jnp.zeros((batch, max_length, logits.shape[-1]) if return_logits else ())
    carry = record(0, logits, jnp.zeros((batch,), bool), cache,
                   jnp.full((batch, max_length), pad_id, jnp.int32), scores)
    _, _, _, tokens, scores = jax.lax.while_loop(
        lambda c: (c[0] < max_length) & ~jnp.all(c[1]), body, carry)
  return (tokens, scores) if return_logits else tokens
