"""HFT (half fine-tuning) of MiniLM-L6 through VADER's domains in sequence: continual learning.

COMMAND: python -m experiments.run --config=configs/minilm_vader_hft.py --workdir=runs/minilm_vader_hft

One stage per domain (movie reviews, then product reviews, then tweets), each starting from
the previous stage's merged model (`start='merged'`) with a task head of its own. HFT
re-selects its trainable half at the start of every stage, as the paper does for each task
of a sequence: stage i draws its half with `method.seed = i`. Every stage uses full
fine-tuning's settings (lr 5e-5), as the paper does. A single stage:
`configs/minilm_vader.py:hft`. `:tiny` runs the chain on a 2-layer random BERT for a few steps.
"""
from configs import language, minilm_vader
from peftjax.models import TINY_BERT

DOMAINS = ('movie', 'amazon', 'tweets')


def get_config(arg: str = ''):
  if arg not in ('', 'tiny'):
    raise ValueError(f"unknown variant {arg!r} after the config file's ':'; expected 'tiny'")
  stages = {}
  for i, domain in enumerate(DOMAINS):
    stage = minilm_vader.get_config('hft')
    stage.data.domain = domain
    stage.method.seed = i  # a new half each stage
    if i:
      stage.start = 'merged'
    if arg == 'tiny':
      stage.model = dict(TINY_BERT)
      stage.data.update({'limit': 48, 'max_length': 32})
      stage.train.update({'batch_size': 16, 'eval_batch_size': 32, 'epochs': 1,
                          'checkpoint_every': 0, 'log_every': 1})
    stages[domain] = stage
  return language.chain(**stages)
