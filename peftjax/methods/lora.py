"""LoRA and rsLoRA.

LoRA: "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., 2021): a frozen
weight W (in, out) runs as W + (alpha / r) * A @ B with trainable A (in, r) and B (r, out).
rsLoRA: "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (Kalajdzievski,
2023): scale alpha / sqrt(r) instead.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from peftjax.core import paths as P
from peftjax.core.adapter import Adapter
from peftjax.methods.common import (check_dropout, check_rank, linear_init, select_matrices,
                                    target_list)
from peftjax.methods.low_rank import low_rank, scaling

INITS = ('zeros', 'kaiming_uniform', 'gaussian', 'orthogonal')


def scale_of(config: dict) -> Callable[[str, int], float]:
  """`(path, r) -> scale` of a lora / rslora / lora_pro config (alpha per `alpha_pattern`)."""
  def scale(path, r):
    alpha = P.first_match(path, config.get('alpha_pattern'), config['alpha'])
    return scaling(alpha, r, config.get('rslora', False))
  return scale


def _init(kind: str, key, shape, rank: int, fan_in: int, dtype):
  if kind == 'zeros':
    return jnp.zeros(shape, dtype)
  if kind == 'kaiming_uniform':  # torch's Linear default
    return linear_init(key, shape, fan_in, dtype)
  if kind == 'gaussian':  # HF PEFT's init_lora_weights='gaussian': N(0, 1/r)
    return jax.random.normal(key, shape, dtype) / rank
  if kind == 'orthogonal':
    return jax.nn.initializers.orthogonal()(key, shape, dtype)
  raise ValueError(f'unknown LoRA init {kind!r}; expected one of {INITS}')


def lora(targets, rank: int = 8, alpha: float = 16.0, *, dropout: float = 0.0,
         rslora: bool = False, rank_pattern: dict | None = None,
         alpha_pattern: dict | None = None, init_a: str = 'kaiming_uniform',
         init_b: str = 'zeros') -> Adapter:
  """LoRA on every 2-D parameter whose path matches a regex of `targets`.

  Args:
    targets: regexes searched in slash paths, e.g. `attention/(query|value)/kernel`.
    rank, alpha: default rank and alpha; scale = alpha / r (alpha / sqrt(r) with `rslora`).
    dropout: dropout on the input of the adapter path (training only).
    rank_pattern, alpha_pattern: `{regex: value}` overrides, first match wins.
    init_a, init_b: one of `INITS`; B = 0 (the default) leaves the model unchanged at init.

  Returns:
    An `Adapter` whose state is `{path: {'a': (in, r), 'b': (r, out)}}` and whose `apply`
      returns `LowRank` leaves; invertible (`unmerge`).

  Raises:
    ValueError: an unknown init. `init` raises `PatternError` for a target that matches
      nothing.

  Example:
    >>> import jax, jax.numpy as jnp, peftjax as pj
    >>> params = {'query': {'kernel': jnp.ones((8, 8))}}
    >>> adapter = pj.lora('query/kernel', rank=2, alpha=4)
    >>> frozen, state = adapter.init(jax.random.key(0), params)
    >>> state['query/kernel']['a'].shape, state['query/kernel']['b'].shape
    ((8, 2), (2, 8))

  References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, arXiv:2106.09685.
  """
  for kind in (init_a, init_b):
    if kind not in INITS:
      raise ValueError(f'unknown LoRA init {kind!r}; expected one of {INITS}')
  check_dropout('LoRA', dropout)
  config = dict(method='lora', targets=target_list(targets),
                rank=rank, alpha=alpha, dropout=dropout, rslora=rslora,
                rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}),
                init_a=init_a, init_b=init_b)

  def init(rng, params, *, calib=None):
    del calib
    flat, chosen = select_matrices(params, config['targets'], rank_pattern=rank_pattern,
                                   alpha_pattern=alpha_pattern)
    state = {}
    for key, path in zip(jax.random.split(rng, len(chosen)), chosen):
      w = flat[path]
      r = check_rank('LoRA', path, P.first_match(path, rank_pattern, rank), w.shape)
      (d_in, d_out), (ka, kb) = w.shape, jax.random.split(key)
      state[path] = {'a': _init(init_a, ka, (d_in, r), r, d_in, w.dtype),
                     'b': _init(init_b, kb, (r, d_out), r, r, w.dtype)}
    return params, state

  return low_rank('LoRA', config, init, scale_of(config), dropout=dropout)


def rslora(targets, rank: int = 8, alpha: float = 16.0, **kwargs) -> Adapter:
  """rsLoRA: LoRA scaled by alpha / sqrt(r).

  "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (Kalajdzievski, 2023,
  arXiv:2312.03732). Arguments and result as `lora` with `rslora=True`.

  Example:
    >>> import peftjax as pj
    >>> pj.rslora('attention/query/kernel', rank=16).config['rslora']
    True
  """
  return lora(targets, rank, alpha, rslora=True, **kwargs)
