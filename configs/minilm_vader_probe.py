"""Linear probe: frozen MiniLM-L6, only a linear head trained on VADER movie reviews.

COMMAND: python -m experiments.run --config=configs/minilm_vader_probe.py --workdir=runs/minilm_vader_probe
"""
import ml_collections

from configs import minilm_vader_lora


def get_config():
  c = minilm_vader_lora.get_config()
  c.method = ml_collections.ConfigDict({'name': 'probe'})
  c.optimizer.lr = 1e-3
  return c
