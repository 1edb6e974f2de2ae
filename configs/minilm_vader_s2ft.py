"""S²FT on MiniLM-L6 for the sentiment of VADER's movie-review sentences: the rows of the
output projection of 5.2% of the attention heads and of the down projection of 2% of the FFN
channels (the official LLaMA-2 ratios), drawn at random over all blocks.

COMMAND: python -m experiments.run --config=configs/minilm_vader_s2ft.py --workdir=runs/minilm_vader_s2ft
(the same as --config=configs/minilm_vader.py:s2ft)
"""
from configs import minilm_vader


def get_config():
  return minilm_vader.get_config('s2ft')
