"""LoRA on MiniLM-L6 for the sentiment of VADER's movie-review sentences (the main job).

COMMAND: python -m experiments.run --config=configs/minilm_vader_lora.py --workdir=runs/minilm_vader_lora
(the same as --config=configs/minilm_vader.py:lora)
"""
from configs import minilm_vader


def get_config():
  return minilm_vader.get_config('lora')
