"""Tiny trainer runs shared by the trainer tests, and a command for the processes they launch:

  python tests/tiny_runs.py WORKDIR '{"mesh": {...}, "train": {...}, "halt_at_step": N}' [--resume]
"""
from __future__ import annotations

import json
import sys

import ml_collections
import safetensors.numpy

from configs import minilm_vader
from peftjax.models import TINY_BERT


def tiny(method='lora', *, mesh=None, **train_overrides):
  """A 2-layer, 32-wide random BERT on 80 VADER rows: 5 steps per epoch, 2 epochs."""
  c = minilm_vader.get_config(method)
  c.model = ml_collections.ConfigDict(TINY_BERT)
  c.data.limit, c.data.max_length = 80, 32
  c.train.batch_size, c.train.eval_batch_size, c.train.epochs = 16, 32, 2
  c.train.checkpoint_every, c.train.log_every = 2, 2
  c.train.update(train_overrides)
  c.mesh.update(mesh or {})
  return c


def train_losses(workdir):
  return [(r['step'], r['loss']) for r in map(json.loads, (workdir / 'metrics.jsonl').open())
          if r['kind'] == 'train']


def adapter_tensors(workdir):
  return safetensors.numpy.load_file(str(workdir / 'adapter' / 'adapter.safetensors'))


if __name__ == '__main__':
  from peftjax.train.loop import train  # pylint: disable=g-import-not-at-top
  overrides = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
  train(tiny(mesh=overrides.get('mesh'), **overrides.get('train', {})), sys.argv[1],
        resume='--resume' in sys.argv, halt_at_step=overrides.get('halt_at_step', 0))
