"""Full (or selective) fine-tuning and the frozen linear probe, in the method contract."""
from __future__ import annotations

from peftjax.core.adapter import Adapter, combine, partition


def full(targets=('.*',)) -> Adapter:
  """Trains the parameters matched by `targets` directly (all of them by default)."""
  targets = [targets] if isinstance(targets, str) else list(targets)

  def init(rng, params, *, calib=None):
    del rng, calib
    state, frozen = partition(params, targets)
    return frozen, state

  def apply(frozen, state):
    return combine(state, frozen)

  return Adapter(init=init, apply=apply, config={'method': 'full', 'targets': targets},
                 unmerge=lambda merged, state: partition(merged, targets)[1])


def probe() -> Adapter:
  """Trains nothing in the model: only a task head on top of it learns (a linear probe)."""
  return Adapter(init=lambda rng, params, *, calib=None: (params, {}),
                 apply=lambda frozen, state: frozen, config={'method': 'probe'},
                 unmerge=lambda merged, state: merged)
