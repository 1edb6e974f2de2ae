"""Regularized mask tuning (R-AMT) of MiniLM-L6 for VADER movie-review sentiment: binary masks
on every encoder kernel, with gradient dropout.

COMMAND: python -m experiments.run --config=configs/minilm_vader_mask_tuning.py --workdir=runs/minilm_vader_mask_tuning
(the same as --config=configs/minilm_vader.py:mask_tuning)
"""
from configs import minilm_vader


def get_config():
  return minilm_vader.get_config('mask_tuning')
