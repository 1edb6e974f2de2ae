"""peftjax: parameter-efficient fine-tuning as pure functions over Flax param trees."""
from peftjax.core.adapter import (Adapter, chain, combine, merge, num_params, partition,
                                  regularizer, summary, unmerge)
from peftjax.core.leaves import LowRank, materialize
from peftjax.core.paths import PatternError, flatten, select, unflatten
from peftjax.methods import from_config, full, lora, probe, rslora

__version__ = '0.1.0'
