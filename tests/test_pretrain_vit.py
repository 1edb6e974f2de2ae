"""The ViT pretraining command: it caches the best epoch's params and head, which the model
config `{'name': 'vit', 'checkpoint': ...}` then loads, and skips when the cache holds them."""
from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import pytest

from experiments import pretrain_vit
from peftjax import tasks
from peftjax.data import assets
from peftjax.models import TINY_VIT, build, vit

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


def tiny_pretraining():
  from configs import vit_fashion_mnist  # pylint: disable=g-import-not-at-top
  c = vit_fashion_mnist.get_config()
  c.model = ml_collections.ConfigDict({**TINY_VIT, 'remat': False, 'init': ''})
  c.data.update({'name': 'digits', 'limit': 48})
  c.optimizer.update({'lr': 3e-3, 'warmup_steps': 2})
  c.train.update({'batch_size': 16, 'eval_batch_size': 16, 'epochs': 2, 'checkpoint_every': 0})
  return c


@pytest.mark.long
def test_pretrain_caches_the_best_epoch_and_then_skips(tmp_path, monkeypatch):
  (tmp_path / 'cache').mkdir()
  (tmp_path / 'cache' / 'digits').symlink_to(assets.asset_path('digits'))  # the data only
  monkeypatch.setenv('PEFTJAX_CACHE', str(tmp_path / 'cache'))
  config = tiny_pretraining()
  folder = pretrain_vit.pretrain(config, tmp_path / 'run')
  assert folder == tmp_path / 'cache' / 'vit' / 'digits'
  info = vit.read_info(folder)
  assert info['data'] == 'digits' and info['num_classes'] == 10

  # The cached model and head score the run's test accuracy on the same split.
  model, head = vit.load_pretrained('digits', with_head=True)
  assert build(ml_collections.ConfigDict({'name': 'vit', 'checkpoint': 'digits'})).model_id \
      == model.model_id
  task = tasks.build(config, model)
  eval_sums = jax.jit(task.eval_sums)
  sums = [eval_sums(model.params, head, b) for b in task.batches('test', 16)]
  accuracy = sum(float(s['accuracy']) for s in sums) / sum(float(s['count']) for s in sums)
  assert accuracy == pytest.approx(info['summary']['test_accuracy'], abs=1e-6)
  saved = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  assert saved['test_accuracy'] == info['summary']['test_accuracy']
  assert not all(jax.tree.leaves(jax.tree.map(
      np.array_equal, model.params, build(config.model, config.seed).params)))  # it trained

  def no_training(*args, **kwargs):
    raise AssertionError('trained although the checkpoint is cached')

  monkeypatch.setattr('peftjax.train.loop.train', no_training)
  assert pretrain_vit.pretrain(config, tmp_path / 'other') == folder


def test_pretrain_needs_a_random_vit(tmp_path):
  config = tiny_pretraining()
  config.model.checkpoint = 'fashion_mnist'
  with pytest.raises(ValueError, match='needs a randomly initialised ViT'):
    pretrain_vit.pretrain(config, tmp_path)
