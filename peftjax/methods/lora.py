"""LoRA and rsLoRA.

LoRA: "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., 2021): a frozen
weight W (in, out) runs as W + (alpha / r) * A @ B with trainable A (in, r) and B (r, out).
rsLoRA: "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (Kalajdzievski,
2023): scale alpha / sqrt(r) instead.
"""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from peftjax.core import paths as P
from peftjax.core.adapter import Adapter
from peftjax.core.leaves import LowRank
from peftjax.methods.common import check_dropout, select_matrices, target_list

INITS = ('zeros', 'kaiming_uniform', 'gaussian', 'orthogonal')


def scaling(alpha: float, rank: int, rslora: bool = False) -> float:
  return alpha / math.sqrt(rank) if rslora else alpha / rank


def _init(kind: str, key, shape, rank: int, fan_in: int, dtype):
  if kind == 'zeros':
    return jnp.zeros(shape, dtype)
  if kind == 'kaiming_uniform':  # torch's Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
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
  """
  for kind in (init_a, init_b):
    if kind not in INITS:
      raise ValueError(f'unknown LoRA init {kind!r}; expected one of {INITS}')
  check_dropout('LoRA', dropout)
  config = dict(method='lora', targets=target_list(targets),
                rank=rank, alpha=alpha, dropout=dropout, rslora=rslora,
                rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}),
                init_a=init_a, init_b=init_b)

  def hyper(path):
    r = P.first_match(path, rank_pattern, rank)
    a = P.first_match(path, alpha_pattern, alpha)
    if not (isinstance(r, int) and r > 0):
      raise ValueError(f'LoRA rank for {path} must be a positive int, got {r!r}')
    return r, scaling(a, r, rslora)

  def init(rng, params, *, calib=None):
    del calib
    flat, chosen = select_matrices(params, config['targets'], rank_pattern=rank_pattern,
                                   alpha_pattern=alpha_pattern)
    state = {}
    for key, path in zip(jax.random.split(rng, len(chosen)), chosen):
      w = flat[path]
      (d_in, d_out), (r, _) = w.shape, hyper(path)
      if r > min(d_in, d_out):
        raise ValueError(f'LoRA rank {r} exceeds min{tuple(w.shape)} of {path}')
      ka, kb = jax.random.split(key)
      state[path] = {'a': _init(init_a, ka, (d_in, r), r, d_in, w.dtype),
                     'b': _init(init_b, kb, (r, d_out), r, r, w.dtype)}
    return params, state

  def apply(frozen, state):
    flat = P.flatten(frozen)
    for path, ab in state.items():
      w = flat[path]
      chex.assert_shape(ab['a'], (w.shape[0], None), custom_message=f'LoRA A of {path}')
      chex.assert_shape(ab['b'], (ab['a'].shape[1], w.shape[1]),
                        custom_message=f'LoRA B of {path}')
      flat[path] = LowRank(w, ab['a'], ab['b'], hyper(path)[1], dropout)
    return P.unflatten(flat)

  def unmerge(merged, state):
    flat = P.flatten(merged)
    for path, ab in state.items():
      flat[path] = flat[path] - (ab['a'] @ ab['b'] * hyper(path)[1]).astype(flat[path].dtype)
    return P.unflatten(flat)

  def describe(frozen, state):
    flat = P.flatten(frozen)
    return {path: {'shape': list(flat[path].shape), 'trainable': ab['a'].size + ab['b'].size,
                   'rank': int(ab['a'].shape[1]), 'scale': hyper(path)[1]}
            for path, ab in state.items()}

  return Adapter(init=init, apply=apply, config=config, unmerge=unmerge, describe=describe)


def rslora(targets, rank: int = 8, alpha: float = 16.0, **kwargs) -> Adapter:
  """rsLoRA: LoRA scaled by alpha / sqrt(r)."""
  return lora(targets, rank, alpha, rslora=True, **kwargs)
