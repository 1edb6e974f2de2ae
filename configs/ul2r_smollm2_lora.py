"""A short continued UL2R run of SmolLM2-135M-Instruct with LoRA, on Jane Austen's novels.

COMMAND: python -m experiments.run --config=configs/ul2r_smollm2_lora.py --workdir=runs/ul2r_smollm2_lora

UL2R (U-PaLM): a few steps of UL2's mixture on a pretrained causal LM, here as a prefix LM
(bidirectional over the inputs): R (0.15, 3), X (0.15, 32), X (0.5, 3) and S, with paradigm
tokens and sentinels on SmolLM2's last vocabulary ids (`peftjax.tasks.lm.special_ids`).
LoRA rank 8, alpha 16 on every attention and MLP projection; 60 steps of batch 8 (128-token
chunks of the train chapters, warm-up + cosine, lr 5e-4); val is the held-out denoising loss
on 64 chunks of unseen chapters, measured before the first step, at step 30 and at the end. `:tiny` runs a 2-layer random Llama for 3 steps (tests).
"""
from configs import language

TARGETS = ('layers_.*/(self_attn|mlp)/.*/kernel',)
TINY = {'name': 'llama', 'vocab_size': 49152, 'hidden_size': 32, 'num_layers': 2,
        'num_heads': 4, 'num_kv_heads': 2, 'intermediate_size': 64}


def get_config(arg: str = ''):
  tiny = arg == 'tiny'
  c = language.ul2(TINY if tiny else {'name': 'smollm2'},
                   {'name': 'lora', 'targets': TARGETS, 'rank': 8, 'alpha': 16.0,
                    'dropout': 0.0},
                   fmt='prefix_lm', tokenizer='smollm2', length=128, mixture='ul2r')
  c.optimizer.update({'lr': 5e-4, 'schedule': 'cosine', 'warmup_steps': 6, 'clip_norm': 1.0,
                      'weight_decay': 0.0})
  c.train.update({'batch_size': 8, 'eval_batch_size': 16, 'epochs': 1, 'max_steps': 60,
                  'log_every': 5, 'checkpoint_every': 20, 'eval_every': 30,
                  'eval_at_start': True})
  c.data.eval_limit = 64
  if tiny:
    c.data.limit = 32
    c.train.update({'max_steps': 3, 'log_every': 1, 'checkpoint_every': 2, 'eval_every': 0})
  return c
