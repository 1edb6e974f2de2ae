"""The sparse and masked fine-tuning methods side by side with LoRA and full fine-tuning.

COMMAND: python -m experiments.run --config=configs/sparse_study.py --workdir=runs/sparse_study

MiniLM-L6 on VADER movie reviews, each method as `configs/minilm_vader.py:METHOD` sets it (its
paper's defaults and learning rate), for one epoch (265 steps of batch 32, batches grouped
by length) so that the study fits in about 90 minutes of two cores: the probe, LoRA, LT-SFT
(phase 1, full fine-tuning, is the table's `full` row), grafting of that full run (the
official mask training: 10 plain gradient steps of 1,024 sentences at lr 1e7), HFT,
S²FT, SaRA, SPT and mask tuning. Composition: LT-SFT on VADER's product reviews (`amazon`,
three epochs of its 2,965 training sentences, 279 steps) is the second sparse difference,
composed with the movie one. Every run trains in a process of its own (peak RSS per run);
finished runs are skipped, so a stopped study continues (`experiments.compare`).

`:tiny`: the probe, LoRA, the two LT-SFT chains and grafting on a 2-layer random BERT and 48
rows (the study's test).
"""
import ml_collections

from configs import minilm_vader, minilm_vader_lt_sft
from peftjax.models import TINY_BERT

METHODS = ('probe', 'lora', 'hft', 's2ft', 'sara', 'spt', 'mask_tuning')
TINY_METHODS = ('probe', 'lora')
FULL = '{workdir}/lt_sft/full/adapter'  # the full fine-tuning that `graft` grafts


def _settings(c, domain: str, epochs: int, tiny: bool):
  c.data.update({'domain': domain, 'group_by_length': 50})
  c.train.update({'epochs': epochs, 'log_every': 50})
  if tiny:
    c.model = ml_collections.ConfigDict(TINY_BERT)
    c.data.update({'limit': 48, 'max_length': 32, 'group_by_length': 0})
    c.train.update({'batch_size': 16, 'eval_batch_size': 32, 'epochs': 1,
                    'checkpoint_every': 0, 'log_every': 1})
  return c


def _lt_sft(domain: str, epochs: int, tiny: bool):
  chain = minilm_vader_lt_sft.get_config('tiny' if tiny else '')
  for name in chain.stage_order:
    _settings(chain.stages[name], domain, epochs, tiny)
  return chain


def get_config(variant: str = ''):
  if variant not in ('', 'tiny'):
    raise ValueError(f"unknown variant {variant!r} after the config file's ':'; expected 'tiny'")
  tiny = variant == 'tiny'
  runs = {name: _settings(minilm_vader.get_config(name), 'movie', 1, tiny)
          for name in (TINY_METHODS if tiny else METHODS)}
  runs['lt_sft'] = _lt_sft('movie', 1, tiny)
  graft = _settings(minilm_vader.get_config('graft'), 'movie', 1, tiny)
  graft.method.finetuned = graft.head.init = FULL
  # The official mask training's steps (random batches of 1,024), not the study's epoch;
  # tiny: plain batches of 16.
  graft.data.group_by_length = 0
  graft.train.update({'accumulate': 1, 'max_steps': 0, 'eval_every': 0} if tiny else
                     {**minilm_vader.GRAFT_TRAIN, 'log_every': 1})
  runs['graft'] = graft
  runs['lt_sft_amazon'] = _lt_sft('amazon', 3, tiny)
  order = ['probe', 'lora', 'lt_sft', 'graft'] + [m for m in runs if m not in (
      'probe', 'lora', 'lt_sft', 'graft', 'lt_sft_amazon')] + ['lt_sft_amazon']

  c = ml_collections.ConfigDict()
  c.runs = ml_collections.ConfigDict({name: runs[name] for name in order}, sort_keys=False)
  rows = {'probe': 'probe', 'full': 'lt_sft/full', 'lora': 'lora', 'lt_sft': 'lt_sft/sparse'}
  rows |= {m: m for m in METHODS[2:] if m in runs}
  rows |= {'graft': 'graft', 'lt_sft (amazon)': 'lt_sft_amazon/sparse'}
  c.rows = ml_collections.ConfigDict(rows, sort_keys=False)
  c.baseline = 'full'
  c.compose = ml_collections.ConfigDict({'parts': ('lt_sft', 'lt_sft (amazon)')})
  c.recovery = ml_collections.ConfigDict({'row': 'graft', 'full': 'full', 'probe': 'probe'})
  c.only = ''
  return c
