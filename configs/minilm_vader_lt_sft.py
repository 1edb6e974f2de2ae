"""LT-SFT (composable sparse fine-tuning) of MiniLM-L6 on VADER movie reviews, in two stages.

COMMAND: python -m experiments.run --config=configs/minilm_vader_lt_sft.py --workdir=runs/minilm_vader_lt_sft

`full`: every encoder weight fine-tunes (phase 1); `sparse`: the 0.5% of encoder-kernel
entries that phase 1 changed most (one global threshold) train from the pretrained weights
(phase 2, `start='reference'`), with the official code's L1 pull of 0.1 towards them. Both
phases use the same schedule, as in the paper, and phase 2 the sparse methods' learning rate
(1e-3): like the official code, it starts its task head again from its init, and at phase
1's 5e-5 its training loss stayed at ln 2 for 100 steps (`configs/sparse_study.py`).
`:tiny` runs both on a 2-layer random BERT for a few steps (tests).
"""
from configs import language, minilm_vader
from peftjax.models import TINY_BERT

DENSITY = 0.005
SPARSE_LR = 1e-3


def get_config(arg: str = ''):
  full = minilm_vader.get_config('full')
  sparse = minilm_vader.get_config('full')
  sparse.method = {'name': 'sparse_ft', 'targets': minilm_vader.TARGETS, 'density': DENSITY,
                   'select': 'change', 'l1': 0.1, 'reference': ''}
  sparse.optimizer.lr = SPARSE_LR
  sparse.start = 'reference'
  if arg == 'tiny':
    for stage in (full, sparse):
      stage.model = dict(TINY_BERT)
      stage.data.update({'limit': 48, 'max_length': 32})
      stage.train.update({'batch_size': 16, 'eval_batch_size': 32, 'epochs': 1,
                          'checkpoint_every': 0, 'log_every': 1})
    sparse.method.density = 0.05
    sparse.optimizer.lr = 1e-2
  elif arg:
    raise ValueError(f"unknown variant {arg!r} after the config file's ':'; expected 'tiny'")
  return language.chain(full=full, sparse=sparse)
