"""peftjax: parameter-efficient fine-tuning as pure functions over Flax param trees.

With a model of your own: `adapter.init` its params, run `adapter.apply(frozen, state)` with
`structured_layers()` (or `apply`) around the module's apply so that its `flax.linen` layers
compute the structured leaves, `merge` for a plain tree, `save_adapter` / `load_adapter` for
files; `dense` is the structured matmul for layers of your own.
"""
from peftjax.core.adapter import (Adapter, chain, combine, merge, num_params, partition,
                                  regularizer, summary, transform, unmerge)
from peftjax.core.adapter import NotMergeableError
from peftjax.core.calib import Calibration
from peftjax.core.leaves import LowRank, Scaled, SparseDelta, dense, materialize
from peftjax.core.linen import apply, structured_layers
from peftjax.core.paths import PatternError, flatten, select, unflatten
from peftjax.io.adapter_file import AdapterFileError, load_adapter, load_head, save_adapter
from peftjax.methods import (REGISTRY, binarized_graft, corda, eva, from_config, full, graft,
                             hft, loldu, lora, lora_ga, lora_pro, mask_tuning, milora, pissa,
                             probe, rslora, s2ft, sara, soka, soma, sorsa, sparse_ft, spt,
                             svfit)
from peftjax.methods import bottleneck_adapter, merge_mosa, mosa
from peftjax.methods import bitfit, ia3, ln_tuning, ssf
from peftjax.methods import dvpt, vpt
from peftjax.methods import side
from peftjax.methods import low_precision

__version__ = '0.1.0'

__all__ = [
    'Adapter', 'AdapterFileError', 'Calibration', 'LowRank', 'PatternError', 'REGISTRY',
    'apply', 'binarized_graft', 'chain', 'combine', 'corda', 'dense', 'eva', 'flatten',
    'from_config', 'full', 'graft', 'hft', 'load_adapter', 'load_head', 'loldu', 'lora',
    'lora_ga', 'lora_pro', 'mask_tuning', 'materialize', 'merge', 'milora', 'num_params',
    'partition', 'pissa', 'probe', 'regularizer', 'rslora', 's2ft', 'sara', 'SparseDelta',
    'save_adapter', 'select', 'soka', 'soma', 'sorsa', 'sparse_ft', 'spt',
    'structured_layers', 'summary', 'svfit', 'transform', 'unflatten', 'unmerge',
    'NotMergeableError', 'bottleneck_adapter', 'merge_mosa', 'mosa',
    'bitfit', 'ia3', 'ln_tuning', 'Scaled', 'ssf',
    'dvpt', 'vpt',
    'side',
    'low_precision',
]
