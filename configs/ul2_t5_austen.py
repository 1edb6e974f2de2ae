"""UL2 pretraining of a small T5 from scratch on Jane Austen's novels, then VADER sentiment
as text-to-text from that checkpoint.

COMMAND: python -m experiments.run --config=configs/ul2_t5_austen.py[:METHOD] --workdir=runs/ul2_t5_austen

Stage `ul2_pretrain`: every weight of a 4.5M-param T5.1.1 (`MODEL`: 4+4 layers, width 128, 4
heads of 32, gated-GELU FFN 512, untied output) trained from random init with UL2's seven
denoisers (uniform mixture, paradigm tokens) on 128-token chunks of the novels' train
chapters, byte-level BPE of 8192 tokens trained on them, 5 epochs (1,010 steps of batch 32),
warm-up + cosine; selection by held-out denoising loss on unseen chapters.
Stage `finetune` starts from the merged result: sentence -> 'negative' / 'positive' with the
'[NLU]' mode token, METHOD any method name (default `full`; e.g. `lora`).
`:scratch` is the `finetune` stage alone from random init (the baseline without UL2), and
`:tiny` runs both stages on a 2-layer model for a few steps (tests).
"""
import ml_collections

from configs import language
from configs.minilm_vader import method_config
from peftjax.models.t5 import TINY_CPU

# Sized for a 2-core CPU: about 1.5 s per training step of 32 rows (128 + 127 tokens).
MODEL = {**TINY_CPU, 'dropout': 0.0}  # T5.1.1 pre-trains without dropout

TINY = {'name': 't5', 'vocab_size': 8192, 'd_model': 32, 'num_heads': 2, 'head_dim': 16,
        'd_ff': 64, 'encoder_layers': 1, 'decoder_layers': 1}


def get_config(arg: str = 'full'):
  tiny, scratch = arg == 'tiny', arg == 'scratch'
  method = 'lora' if tiny else 'full' if scratch else arg
  model = TINY if tiny else MODEL
  pre = language.ul2(model, {'name': 'full'}, fmt='encoder_decoder', tokenizer='bpe',
                     length=128)
  pre.optimizer.update({'lr': 2e-3, 'schedule': 'cosine', 'warmup_steps': 100,
                        'weight_decay': 0.01, 'clip_norm': 1.0})
  pre.train.update({'batch_size': 32, 'eval_batch_size': 64, 'epochs': 5, 'log_every': 50,
                    'checkpoint_every': 200, 'eval_at_start': True})
  pre.data.eval_limit = 256
  fine = language.sentiment(model, {'name': method}, fmt='encoder_decoder', tokenizer='bpe')
  fine.method = ml_collections.ConfigDict(
      {'init': '', **method_config(method), 'targets': ('(encoder|decoder)/.*/kernel',)}
      if method not in ('full', 'probe') else {'init': '', 'name': method})
  fine.optimizer.update({'lr': 3e-4 if method == 'full' else 1e-3, 'clip_norm': 1.0})
  fine.train.update({'batch_size': 32, 'eval_batch_size': 64, 'epochs': 3})
  fine.start = 'merged'
  if tiny:
    for stage in (pre, fine):
      stage.data.limit = 64
      stage.train.update({'batch_size': 8, 'eval_batch_size': 16, 'epochs': 1, 'max_steps': 3,
                          'log_every': 1, 'checkpoint_every': 2, 'eval_at_start': False})
  if scratch:
    return fine
  return language.chain(ul2_pretrain=pre, finetune=fine)
