"""Linear probe: frozen MiniLM-L6, only a linear head trained on VADER movie reviews.

COMMAND: python -m experiments.run --config=configs/minilm_vader_probe.py --workdir=runs/minilm_vader_probe
(the same as --config=configs/minilm_vader.py:probe)
"""
from configs import minilm_vader


def get_config():
  return minilm_vader.get_config('probe')
