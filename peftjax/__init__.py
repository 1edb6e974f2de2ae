"""peftjax: parameter-efficient fine-tuning as pure functions over Flax param trees."""
from peftjax.core.adapter import (Adapter, chain, combine, merge, num_params, partition,
                                  regularizer, summary, transform, unmerge)
from peftjax.core.leaves import LowRank, materialize
from peftjax.core.paths import PatternError, flatten, select, unflatten
from peftjax.core.calib import Calibration
from peftjax.methods import (corda, eva, from_config, full, loldu, lora, lora_ga, lora_pro,
                             milora, pissa, probe, rslora, soka, soma, sorsa, svfit)

__version__ = '0.1.0'
