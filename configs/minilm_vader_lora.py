"""LoRA on MiniLM-L6 for the sentiment of VADER's movie-review sentences.

COMMAND: python -m experiments.run --config=configs/minilm_vader_lora.py --workdir=runs/minilm_vader_lora
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict({'name': 'minilm'})
  c.data = ml_collections.ConfigDict(
      {'name': 'vader', 'domain': 'movie', 'max_length': 64, 'bucket': 16, 'limit': 0})
  c.method = ml_collections.ConfigDict({
      'name': 'lora', 'targets': ('encoder/.*/kernel',), 'rank': 8, 'alpha': 16.0,
      'dropout': 0.1, 'rslora': False})
  c.optimizer = ml_collections.ConfigDict({
      'lr': 1e-3, 'weight_decay': 0.01, 'b1': 0.9, 'b2': 0.999, 'eps': 1e-8,
      'schedule': 'constant', 'warmup_steps': 0, 'clip_norm': 0.0})
  c.train = ml_collections.ConfigDict({
      'batch_size': 32, 'eval_batch_size': 64, 'epochs': 3, 'max_steps': 0, 'log_every': 20,
      'checkpoint_every': 100, 'keep_checkpoints': 2,
      'halt_at_step': 0})  # halt_at_step: stop abruptly there, as a crash would (resume tests).
  c.mesh = ml_collections.ConfigDict({'data': -1})
  return c
