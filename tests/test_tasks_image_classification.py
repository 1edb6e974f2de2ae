"""Image classification through the trainer: a tiny random ViT learns a tiny image set with
full training and with LoRA; the task's data, shapes and config errors."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from configs import vit_fashion_mnist
from peftjax import tasks
from peftjax.data import images
from peftjax.models import TINY_VIT, Model, build
from peftjax.tasks.image_classification import ImageClassification
from peftjax.train.loop import train

LEVELS = 4


def brightness_levels(n: int, seed: int) -> images.Images:
  """Noise images whose label (0..3) is their brightness level."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, LEVELS, n).astype(np.int32)
  x = rng.integers(0, 80, (n, 28, 28)) + 55 * labels[:, None, None]
  return images.Images(x.astype(np.uint8), labels)


def tiny_config(method: dict):
  c = vit_fashion_mnist.get_config()
  c.model = ml_collections.ConfigDict({**TINY_VIT, 'remat': False, 'init': ''})
  c.method = ml_collections.ConfigDict(method)
  c.optimizer.update({'lr': 3e-3, 'schedule': 'constant', 'warmup_steps': 0})
  c.train.update({'batch_size': 16, 'eval_batch_size': 32, 'epochs': 3, 'log_every': 1,
                  'checkpoint_every': 0, 'eval_at_start': True})
  return c


@pytest.fixture(scope='module')
def model():
  return build(ml_collections.ConfigDict(TINY_VIT))


@pytest.mark.parametrize('method', [
    {'name': 'full'},
    pytest.param({'name': 'lora', 'targets': ('encoder/.*/kernel',), 'rank': 4, 'alpha': 8.0},
                 marks=pytest.mark.long)])
def test_trainer_steps_reduce_the_loss(tmp_path, model, method):
  data = {split: brightness_levels(n, seed) for seed, (split, n)
          in enumerate(zip(images.SPLITS, (64, 32, 32)))}
  task = ImageClassification(model, data)
  assert task.num_classes == LEVELS
  summary = train(tiny_config(method), tmp_path, task=task)
  assert summary['steps'] == 12 and summary['task'] == 'image_classification'
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').open()]
  losses = [r['loss'] for r in records if r['kind'] == 'val']
  assert losses[-1] < 0.8 * losses[0], losses
  assert summary['test_accuracy'] > 0.5


def test_from_config_builds_the_data_and_head(model):
  c = tiny_config({'name': 'full'})
  c.data.update({'name': 'digits', 'limit': 40})
  task = tasks.build(c)
  assert isinstance(task, ImageClassification) and task.num_classes == 10
  assert {s: len(task.data[s]) for s in images.SPLITS} == {s: 40 for s in images.SPLITS}
  head = task.init_head(jax.random.key(0))
  assert head['kernel'].shape == (16, 10) and head['bias'].shape == (10,)
  batch = next(task.batches('train', 16, seed=0))
  (spec,) = task.batch_shapes(16)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (v.shape, v.dtype) for k, v in spec.items()}
  assert task.num_batches('val', 16) == 3
  metrics = jax.jit(task.eval_sums)(task.model.params, head, batch)
  assert float(metrics['count']) == 16 and 0 <= float(metrics['accuracy']) <= 16


def test_unknown_data_set_is_a_config_error():
  c = tiny_config({'name': 'full'})
  c.data.name = 'cifar10'
  with pytest.raises(ValueError, match=r"unknown data set 'cifar10' for image classification; "
                     r"expected one of \('fashion_mnist', 'mnist', 'digits'\)"):
    tasks.build(c)


class _TokenModel(nn.Module):
  @nn.compact
  def __call__(self, x, *, train=False):
    return nn.Dense(8)(x.reshape(x.shape[0], 28, 28))


def test_a_model_without_pooled_features_is_rejected():
  module = _TokenModel()
  params = module.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))['params']
  task = ImageClassification(Model(module, params, 'tokens'), {'train': brightness_levels(4, 0)})
  with pytest.raises(ValueError, match=r'features \[B, width\]; tokens returns shape '
                     r'\(1, 28, 8\)'):
    task.init_head(jax.random.key(0))
