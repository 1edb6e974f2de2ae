"""The LoRA shape that LoRA, rsLoRA, LoRA-Pro, PiSSA, MiLoRA / SoMA, CorDA, EVA and LoRA-GA
share: a state `{path: {'a': (in, r), 'b': (r, out)}}` that runs the weight W at `path` as
W + scale * A @ B. The methods differ only in `init` (how A, B and the frozen W come about)
and in their scale; `scaling` is the scale formula and `low_rank` builds the rest.
"""
from __future__ import annotations

import math
from typing import Callable

import chex

from peftjax.core import paths as P
from peftjax.core.adapter import Adapter
from peftjax.core.calib import CalibratedResidual
from peftjax.core.leaves import LowRank


def scaling(alpha: float | None, r: int, rslora: bool = False) -> float:
  """alpha / r (LoRA), alpha / sqrt(r) with `rslora` (rsLoRA); 1 when alpha is None."""
  if alpha is None:
    return 1.0
  return alpha / math.sqrt(r) if rslora else alpha / r


def low_rank(name: str, config: dict, init: Callable, scale: Callable[[str, int], float], *,
             dropout: float = 0.0, invertible: bool = True, every_target: bool = False,
             **fields) -> Adapter:
  """A LoRA-shaped method from its `init(rng, params, *, calib=None) -> (frozen, state)`.

  Args:
    name: the method's name in error messages.
    config: its JSON-able config, with the `targets` it adapts.
    scale: `scale(path, r)`, the factor of A @ B at `path` for rank r.
    dropout: dropout on the input of the A @ B path (training only).
    invertible: whether `unmerge` exists: False where the frozen leaf keeps factors that the
      merged weight and the state do not determine (a `calib.CalibratedResidual`).
    every_target: `describe` lists every target, with rank 0 where the state has no entry.
    fields: further `Adapter` fields (`tx`, `loss`).
  """

  def apply(frozen, state):
    flat = P.flatten(frozen)
    for path, ab in state.items():
      w = flat[path]
      w = w.w if isinstance(w, CalibratedResidual) else w
      chex.assert_shape(ab['a'], (w.shape[0], None), custom_message=f'{name} A of {path}')
      chex.assert_shape(ab['b'], (ab['a'].shape[1], w.shape[1]),
                        custom_message=f'{name} B of {path}')
      flat[path] = LowRank(w, ab['a'], ab['b'], scale(path, ab['a'].shape[1]), dropout)
    return P.unflatten(flat)

  def unmerge(merged, state):
    flat = P.flatten(merged)
    for path, ab in state.items():
      s = scale(path, ab['a'].shape[1])
      flat[path] = flat[path] - (ab['a'] @ ab['b'] * s).astype(flat[path].dtype)
    return P.unflatten(flat)

  def describe(frozen, state):
    flat = P.flatten(frozen)
    paths = (P.select({p: v for p, v in flat.items() if v.ndim == 2}, config['targets'])
             if every_target else state)
    out = {}
    for path in paths:
      ab = state.get(path)
      r = 0 if ab is None else int(ab['a'].shape[1])
      out[path] = {'shape': list(flat[path].shape),
                   'trainable': 0 if ab is None else int(ab['a'].size + ab['b'].size),
                   'rank': r, 'scale': scale(path, r) if r else 0.0}
    return out

  return Adapter(init=init, apply=apply, config=config, unmerge=unmerge if invertible else None,
                 describe=describe, **fields)
