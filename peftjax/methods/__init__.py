"""Fine-tuning methods by their papers' names; `from_config` rebuilds one from its config."""
from __future__ import annotations

from peftjax.core.adapter import Adapter, chain
from peftjax.methods.adapters import bottleneck_adapter
from peftjax.methods.data_init import corda, eva, lora_ga
from peftjax.methods.full import bitfit, full, ln_tuning, probe
from peftjax.methods.grafting import binarized_graft, graft
from peftjax.methods.hft import hft
from peftjax.methods.lora import lora, rslora
from peftjax.methods.lora_pro import lora_pro
from peftjax.methods.low_precision import low_precision
from peftjax.methods.mask_tuning import mask_tuning
from peftjax.methods.mosa import merge_mosa, mosa
from peftjax.methods.prompts import dvpt, vpt
from peftjax.methods.s2ft import s2ft
from peftjax.methods.scale_shift import ia3, ssf
from peftjax.methods.sensitivity import spt
from peftjax.methods.side import side
from peftjax.methods.sparse import sparse_ft
from peftjax.methods.sparse_low_rank import sara
from peftjax.methods.svd_init import loldu, milora, pissa, soka, soma, sorsa, svfit

REGISTRY = {'lora': lora, 'rslora': rslora, 'full': full, 'probe': probe}
REGISTRY |= {'pissa': pissa, 'milora': milora, 'soma': soma, 'sorsa': sorsa, 'svfit': svfit,
             'loldu': loldu, 'soka': soka}
REGISTRY |= {'lora_pro': lora_pro}
REGISTRY |= {'corda': corda, 'eva': eva, 'lora_ga': lora_ga}
REGISTRY |= {'sparse_ft': sparse_ft, 'spt': spt, 'hft': hft, 's2ft': s2ft,
             'sara': sara}
REGISTRY |= {'mask_tuning': mask_tuning, 'graft': graft}
REGISTRY |= {'adapter': bottleneck_adapter, 'mosa': mosa}
REGISTRY |= {'ssf': ssf, 'ia3': ia3, 'bitfit': bitfit, 'ln_tuning': ln_tuning}
REGISTRY |= {'vpt': vpt, 'dvpt': dvpt}
REGISTRY |= {'side': side}
REGISTRY |= {'low_precision': low_precision}


def from_config(config: dict) -> Adapter:
  """The method that `config` (an `Adapter.config`) describes.

  Args:
    config: `{'method': NAME, **kwargs}` with NAME in `REGISTRY` or 'chain'
      (`{'method': 'chain', 'adapters': [configs]}`).

  Returns:
    `REGISTRY[NAME](**kwargs)`.

  Raises:
    ValueError: an unknown method name.

  Example:
    >>> import peftjax as pj
    >>> adapter = pj.from_config({'method': 'lora', 'targets': 'query/kernel', 'rank': 4})
    >>> pj.from_config(adapter.config).config == adapter.config
    True
  """
  config = dict(config)
  name = config.pop('method', None)
  if name == 'chain':
    return chain(*(from_config(c) for c in config['adapters']))
  if name not in REGISTRY:
    raise ValueError(f'unknown method {name!r}; known: {sorted(REGISTRY) + ["chain"]}')
  return REGISTRY[name](**config)
