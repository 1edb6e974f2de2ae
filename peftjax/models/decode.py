"""Batched autoregressive generation with a KV cache, for `Llama` (any module with its
`init_cache` / `cache=` protocol).

Prompts of different lengths share one batch: each row is shifted right so that every prompt
ends in the same cache slot, its padding becomes segment 0 (never attended) and its RoPE
positions still start at 0. One prefill call fills the cache; each new token is then one
single-token call. Sampling is greedy (`temperature=0`) or from the temperature-scaled
distribution restricted to its nucleus (top-p; Holtzman et al., 2020, arXiv:1904.09751).
Params may hold structured leaves (LoRA): the calls run through `peftjax.core.linen`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.core import linen
from peftjax.models.llama import init_cache


class Generation(NamedTuple):
  """New tokens [B, N] (`pad_id` after a row stops), their count per row [B] (an eos
  included), whether each row emitted eos [B], and with `return_logits` the float32 logits
  [B, N, vocab] each token was chosen from (None otherwise)."""
  tokens: jax.Array
  lengths: jax.Array
  stopped: jax.Array
  logits: jax.Array | None = None


def generate(model, params, prompt_ids, prompt_lengths=None, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, rng=None, eos_id: int | None = None,
             pad_id: int | None = None, prefix_lm: bool = False,
             return_logits: bool = False) -> Generation:
  """Continues each prompt by up to `max_new_tokens` tokens (jitted; stops early once every
  row has emitted `eos_id`). It compiles once per module, param structure, batch shape,
  `max_new_tokens` and `return_logits`: the sampling settings, ids and `prefix_lm` are traced.

  Args:
    model: a `peftjax.models.Model` or the `Llama` module itself.
    params: its params, plain or with structured leaves.
    prompt_ids: [B, P] int, each prompt left-aligned and right-padded.
    prompt_lengths: [B] real tokens per row, 1..P; None: every row is P long.
    max_new_tokens: N; P + N must not exceed the model's `config.max_length`.
    temperature: 0 for greedy decoding, else the softmax temperature of sampling.
    top_p: sample only from the smallest set of tokens holding this much probability.
    rng: a PRNG key, needed when sampling; the same key gives the same tokens.
    eos_id: a row stops after emitting it.
    pad_id: fills a row after it stops; default `eos_id`, else 0.
    prefix_lm: attend bidirectionally inside each prompt (a prefix LM's prompt).
    return_logits: also return the logits of every step.

  Returns:
    A `Generation`.
  """
  module = getattr(model, 'module', model)
  prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1:
    raise ValueError(f'expected prompt_ids [batch, length >= 1], got shape {prompt_ids.shape}')
  b, p = prompt_ids.shape
  limit = module.config.max_length
  if max_new_tokens < 1 or p + max_new_tokens > limit:
    raise ValueError(f'expected 1 <= max_new_tokens <= max_length - prompt length = '
                     f'{limit} - {p}, got {max_new_tokens}')
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f'expected temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}')
  if temperature > 0 and rng is None:
    raise ValueError('sampling (temperature > 0) needs an rng key')
  if prompt_lengths is None:
    prompt_lengths = np.full((b,), p, np.int32)
  try:
    got = np.asarray(prompt_lengths)
  except jax.errors.TracerArrayConversionError:  # inside a caller's jit: no value to check
    got = None
  if got is not None and (got.shape != (b,) or got.min() < 1 or got.max() > p):
    raise ValueError(f'expected prompt_lengths [{b}] in 1..{p}, got {got.tolist()}')
  pad = (0 if eos_id is None else eos_id) if pad_id is None else pad_id
  scalars = [jnp.asarray(x, dtype) for x, dtype in (
      (temperature, jnp.float32), (top_p, jnp.float32),
      (-1 if eos_id is None else eos_id, jnp.int32), (pad, jnp.int32), (prefix_lm, bool))]
  return _generate(module, params, prompt_ids, jnp.asarray(prompt_lengths, jnp.int32),
                   jax.random.key(0) if rng is None else rng, *scalars,
                   steps=int(max_new_tokens), return_logits=bool(return_logits))


def choose(logits, rng, temperature, top_p):
  """Next tokens [B] from logits [B, V]: argmax if `temperature` is 0, else a sample of
  softmax(logits / temperature) restricted to its top-p nucleus. `temperature` and `top_p`
  may be traced (sweeping them does not recompile)."""

  def sample(logits):
    logits = logits.astype(jnp.float32) / temperature
    logits = jax.lax.cond(top_p < 1.0, _nucleus, lambda x, _: x, logits, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)

  greedy = lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.lax.cond(temperature > 0, sample, greedy, logits)


def _nucleus(logits, top_p):
  """`logits` with every token outside the top-p nucleus at -inf."""
  ranked = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(ranked, axis=-1)
  # Keep a token if the mass ranked above it is below top_p: the best one always stays.
  kept = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  cutoff = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= cutoff, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=('module', 'steps', 'return_logits'))
def _generate(module, params, prompt_ids, lengths, rng, temperature, top_p, eos_id, pad_id,
              prefix_lm, *, steps, return_logits):
  b, p = prompt_ids.shape
  # Shift row i right by p - length_i: every prompt ends in slot p - 1.
  source = jnp.arange(p)[None, :] - (p - lengths)[:, None]
  real = source >= 0
  ids = jnp.where(real, jnp.take_along_axis(prompt_ids, jnp.maximum(source, 0), axis=1), 0)
  table = params['embed_tokens']['embedding']
  cache = init_cache(module.config, b, p + steps, table.dtype)
  logits, cache = linen.apply(module, params, ids, segment_ids=real.astype(jnp.int32),
                              positions=jnp.maximum(source, 0),
                              prefix=real & prefix_lm, cache=cache)

  def pick(state, logits):
    t = state['t']
    token = choose(logits, jax.random.fold_in(rng, t), temperature, top_p)
    token = jnp.where(state['done'], pad_id, token)
    state = {**state, 'tokens': state['tokens'].at[:, t].set(token),
             'lengths': state['lengths'] + (~state['done']).astype(jnp.int32),
             'done': state['done'] | (token == eos_id),
             't': t + 1}
    if return_logits:
      state['logits'] = state['logits'].at[:, t].set(logits.astype(jnp.float32))
    return state

  state = {'t': jnp.zeros((), jnp.int32), 'tokens': jnp.full((b, steps), pad_id, jnp.int32),
           'lengths': jnp.zeros((b,), jnp.int32), 'done': jnp.zeros((b,), bool),
           'cache': cache}
  if return_logits:
    state['logits'] = jnp.zeros((b, steps, logits.shape[-1]), jnp.float32)
  state = pick(state, logits[:, -1])

  def step(state):
    last = state['tokens'][:, state['t'] - 1]
    positions = (lengths + state['t'] - 1)[:, None]
    logits, cache = linen.apply(module, params, last[:, None], positions=positions,
                                cache=state['cache'])
    return pick({**state, 'cache': cache}, logits[:, -1])

  def more(state):
    return (state['t'] < steps) & ~jnp.all(state['done'])

  state = jax.lax.while_loop(more, step, state)
  return Generation(state['tokens'], state['lengths'], state['done'], state.get('logits'))
