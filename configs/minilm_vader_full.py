"""Full fine-tuning of MiniLM-L6 on VADER movie reviews (the reference for LoRA).

COMMAND: python -m experiments.run --config=configs/minilm_vader_full.py --workdir=runs/minilm_vader_full
(the same as --config=configs/minilm_vader.py:full)
"""
from configs import minilm_vader


def get_config():
  return minilm_vader.get_config('full')
