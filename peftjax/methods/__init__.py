"""Fine-tuning methods by their papers' names; `from_config` rebuilds one from its config."""
from __future__ import annotations

from peftjax.core.adapter import Adapter, chain
from peftjax.methods.full import full, probe
from peftjax.methods.lora import lora, rslora

REGISTRY = {'lora': lora, 'rslora': rslora, 'full': full, 'probe': probe}


def from_config(config: dict) -> Adapter:
  """The method that `config` (an `Adapter.config`) describes."""
  config = dict(config)
  name = config.pop('method', None)
  if name == 'chain':
    return chain(*(from_config(c) for c in config['adapters']))
  if name not in REGISTRY:
    raise ValueError(f'unknown method {name!r}; known: {sorted(REGISTRY) + ["chain"]}')
  return REGISTRY[name](**config)
