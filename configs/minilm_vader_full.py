"""Full fine-tuning of MiniLM-L6 on VADER movie reviews (the reference for LoRA).

COMMAND: python -m experiments.run --config=configs/minilm_vader_full.py --workdir=runs/minilm_vader_full
"""
import ml_collections

from configs import minilm_vader_lora


def get_config():
  c = minilm_vader_lora.get_config()
  c.method = ml_collections.ConfigDict({'name': 'full'})
  c.optimizer.lr = 5e-5
  return c
