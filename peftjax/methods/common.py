"""Argument checks and target selection shared by the method families."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from peftjax.core import paths as P


def target_list(targets) -> list[str]:
  """`targets` (one regex or several) as a list, as configs record it."""
  return list([targets] if isinstance(targets, str) else targets)


def linear_init(key, shape, fan_in: int, dtype=jnp.float32):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's `nn.Linear` weight init (kaiming_uniform with
  a = sqrt(5))."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def module_paths(flat: dict) -> dict[str, None]:
  """The module paths of a flat param tree (every proper prefix of a param path, e.g.
  `encoder`, `encoder/layer_0`), in tree order, as a dict (an ordered set)."""
  return dict.fromkeys(P.SEP.join(p.split(P.SEP)[:i]) for p in flat
                       for i in range(1, p.count(P.SEP) + 1))


def check_dropout(name: str, dropout: float):
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f'{name} dropout must be in [0, 1), got {dropout}')


def select_matrices(params, targets, **overrides) -> tuple[dict, list[str]]:
  """The flat params and the paths of the 2-D ones `targets` match (every pattern must match
  one); each `{name: {regex: value}}` override must match a chosen path."""
  flat = P.flatten(params)
  chosen = P.select({p: v for p, v in flat.items() if v.ndim == 2}, targets,
                    what='2-D parameter')
  for name, patterns in overrides.items():
    P.check_overrides(chosen, patterns, name)
  return flat, chosen


def check_rank(name: str, path: str | None, r, shape=None, *, factor: int = 1,
               limit: int | None = None) -> int:
  """`r` if it is a positive int with factor * r <= min(shape), or r <= `limit` if given
  (no bound without either): the rank check of every method."""
  if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
    where = '' if path is None else f' for {path}'
    raise ValueError(f'{name} rank{where} must be a positive int, got {r!r}')
  if limit is not None and r > limit:
    raise ValueError(f'{name} rank {r} exceeds the Kronecker rank {limit} of {path}')
  if limit is None and shape is not None and factor * r > min(shape):
    raise ValueError(f'{name} needs {factor} * rank <= min{tuple(shape)} of {path}; rank is {r}'
                     if factor > 1 else f'{name} rank {r} exceeds min{tuple(shape)} of {path}')
  return r
