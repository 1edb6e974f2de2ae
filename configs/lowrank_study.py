"""Do the low-rank family's "faster convergence than LoRA" claims hold, run as the papers ran?

COMMAND: python -m experiments.run --config=configs/lowrank_study.py --workdir=runs/lowrank_study

MiniLM-L6 on VADER movie reviews, one epoch (529 steps of batch 16, batches grouped by
length), every encoder kernel (q, k, v, o, FFN in/out of the six layers) at rank 8, no
adapter dropout. The papers' recipe for every run: AdamW without weight decay, 16 warm-up
steps (3%) then cosine decay to 0, gradients clipped to norm 1 (the HF Trainer's default,
which every paper's code uses). A probe stage trains the head first (1 epoch, lr 3e-3); every
adapter run starts from that head. Each method keeps its paper's baseline pairing:
PiSSA and SORSA against LoRA at alpha = r (scale 1), LoRA-GA and LoRA-Pro against LoRA at
alpha 16, EVA against LoRA at alpha 1. Learning rates 3e-5, 3e-4 and 3e-3 for every method
(seed 0), then more seeds at the baseline's best lr (both sides) and at the method's own best
lr: 5 seeds for the PiSSA and LoRA-GA pairs, 3 for the others; the method at the baseline's
lr, where that is not its own best, keeps seed 0 only (`matched_seeds`), so that the whole
study fits in about three hours of two cores. Val loss every 53 steps.
`--config.only=pissa,lora_ga` runs a subset of the pairs; finished runs are skipped, so a
stopped study continues where it stopped.

`--config=configs/lowrank_study.py:tiny`: the PiSSA pair alone on a 2-layer random BERT
(`peftjax.models.TINY_BERT`) and 64 rows, lrs 1e-3 and 3e-2, 2 seeds; minutes on a CPU (the
study's test runs it).
"""
import ml_collections

from configs import minilm_vader
from peftjax.models import TINY_BERT

TARGETS = ('encoder/.*/kernel',)


def get_config(variant: str = ''):
  if variant not in ('', 'tiny'):
    raise ValueError(f'unknown variant {variant!r} after the config file\'s ":"; known: tiny')
  base = minilm_vader.get_config()
  base.data.group_by_length = 50
  base.optimizer.update({'schedule': 'cosine', 'warmup_steps': 16, 'weight_decay': 0.0,
                         'clip_norm': 1.0})
  base.train.update({'batch_size': 16, 'epochs': 1, 'eval_every': 53, 'log_every': 53,
                     'checkpoint_every': 106})

  def method(name, **kwargs):
    return {'name': name, 'targets': TARGETS, 'rank': 8, 'dropout': 0.0, **kwargs}

  def pair(title, name, baseline, seeds):
    return {'title': title, 'method': name, 'baseline': baseline, 'seeds': seeds}

  c = ml_collections.ConfigDict()
  c.base = base
  c.probe = ml_collections.ConfigDict({'lr': 3e-3, 'epochs': 1})
  c.methods = ml_collections.ConfigDict({
      'lora_r': method('lora', alpha=8.0),
      'lora_a16': method('lora', alpha=16.0),
      'lora_a1': method('lora', alpha=1.0),
      'pissa': method('pissa'),
      'sorsa': method('sorsa', gamma=4e-4),
      'lora_ga': method('lora_ga', alpha=16.0),
      'lora_pro': method('lora_pro', alpha=16.0),
      'eva': method('eva', alpha=1.0),
  })
  c.lrs = (3e-5, 3e-4, 3e-3)
  c.pairs = ml_collections.ConfigDict({
      'pissa': pair('PiSSA vs LoRA (alpha = r)', 'pissa', 'lora_r', 5),
      'lora_ga': pair('LoRA-GA vs LoRA (alpha 16)', 'lora_ga', 'lora_a16', 5),
      'sorsa': pair('SORSA vs LoRA (alpha = r)', 'sorsa', 'lora_r', 3),
      'lora_pro': pair('LoRA-Pro vs LoRA (alpha 16)', 'lora_pro', 'lora_a16', 3),
      'eva': pair('EVA vs LoRA (alpha 1)', 'eva', 'lora_a1', 3),
  }, sort_keys=False)  # the order the pairs run in
  c.matched_seeds = 1  # seeds of the method at the baseline's lr (where not its own best)
  c.report_steps = (106, 265, 529)
  c.only = ''
  if variant == 'tiny':
    c.base.model = ml_collections.ConfigDict(TINY_BERT)
    c.base.data.update({'limit': 64, 'max_length': 16})
    c.base.train.update({'batch_size': 8, 'eval_batch_size': 32, 'eval_every': 3, 'log_every': 3,
                         'checkpoint_every': 0})
    c.base.optimizer.warmup_steps = 1
    c.lrs = (1e-3, 3e-2)
    c.pairs.pissa.seeds, c.matched_seeds = 2, 2
    c.report_steps, c.only = (3, 8), 'pissa'
  return c
