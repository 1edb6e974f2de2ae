"""SmolLM2-135M-Instruct as a causal LM on Jane Austen's novels: LoRA fine-tuning, or the
held-out perplexity of the model as it is.

COMMAND: python -m experiments.run --config=configs/smollm2_austen.py --workdir=runs/smollm2_austen
COMMAND: python -m experiments.evaluate --config=configs/smollm2_austen.py --splits=val,test

Rows of 512 tokens of the novels' chapters (SmolLM2's tokenizer, EOS between chapters); val
and test are unseen chapters of every book (`peftjax.data.austen`), so exp(loss) is the
held-out perplexity. LoRA rank 8, alpha 16 on every attention and MLP projection.
"""
from configs import language
from configs.ul2r_smollm2_lora import TARGETS


def get_config():
  c = language.causal_lm({'name': 'smollm2'},
                         {'name': 'lora', 'targets': TARGETS, 'rank': 8, 'alpha': 16.0,
                          'dropout': 0.0}, tokenizer='smollm2', length=512)
  c.optimizer.update({'lr': 5e-4, 'schedule': 'cosine', 'warmup_steps': 20, 'clip_norm': 1.0,
                      'weight_decay': 0.0})
  c.train.update({'batch_size': 8, 'eval_batch_size': 8, 'epochs': 1, 'max_steps': 100,
                  'log_every': 10, 'checkpoint_every': 50, 'eval_at_start': True})
  return c
