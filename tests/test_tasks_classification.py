"""The sentence classification task, and the boundary between tasks and the trainer."""
from __future__ import annotations

import ast
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from configs import minilm_vader
from peftjax import methods, tasks
from peftjax.data import vader
from peftjax.models import TINY_BERT
from peftjax.train import loop

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imports(folder: str) -> set[str]:
  names = set()
  for path in (ROOT / folder).rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        names |= {f'{node.module}.{a.name}' for a in node.names}
  return names


def test_the_trainer_imports_no_data_set_and_tasks_no_trainer():
  assert not [n for n in _imports('peftjax/train') if n.startswith('peftjax.data')]
  assert not [n for n in _imports('peftjax/tasks') if n.startswith('peftjax.train')]
  # Commands are run as commands; the benchmark's measuring code, the side-by-side runner's
  # job plan, the ViT pretraining's and the bits table's helpers are tested in process.
  assert not [n for n in _imports('tests') if n.startswith('experiments') and not n.startswith((
      'experiments.bench', 'experiments.compare', 'experiments.pretrain_vit',
      'experiments.evaluate.bits_table', 'experiments.evaluate.evaluate_bits'))]


@pytest.fixture(scope='module')
def task():
  c = minilm_vader.get_config()
  c.model = ml_collections.ConfigDict(TINY_BERT)
  c.data.limit, c.data.max_length = 40, 32
  return tasks.build(c)


def test_batches_are_the_data_sets(task):
  tokens, labels = task.data['train']
  assert len(tokens) == 40 and task.num_batches('train', 16) == 3
  expected = list(vader.batches(tokens, labels, 16, seed=3, epoch=1, bucket=16))
  for got, want in zip(task.batches('train', 16, seed=3, epoch=1), expected, strict=True):
    assert got.keys() == want.keys()
    for k in got:
      np.testing.assert_array_equal(got[k], want[k])
  shapes = task.batch_shapes(16)
  assert [s['input_ids'].shape for s in shapes] == [(16, 16), (16, 32)]


def test_head_loss_and_eval_sums(task):
  head = task.init_head(jax.random.key(0))
  assert head['kernel'].shape == (32, 2) and head['bias'].shape == (2,)
  batch = next(task.batches('val', 8))
  logits = np.asarray(task.logits(task.model.params, head, batch), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  rows = -logp[np.arange(8), batch['labels']]
  w = batch['weights']
  sums = task.eval_sums(task.model.params, head, batch)
  np.testing.assert_allclose(sums['loss'], (rows * w).sum(), rtol=1e-5)
  np.testing.assert_allclose(task.loss(task.model.params, head, batch), (rows * w).sum() / w.sum(),
                             rtol=1e-5)
  assert sums['accuracy'] == ((logits.argmax(-1) == batch['labels']) * w).sum()
  assert sums['count'] == w.sum()


def test_unknown_task_and_data_set_are_clear_errors():
  c = minilm_vader.get_config()
  c.task = 'translation'
  with pytest.raises(ValueError, match="unknown task 'translation'; known: "):
    tasks.build(c)
  c = minilm_vader.get_config()
  c.data.name = 'imdb'
  with pytest.raises(ValueError, match="unknown data set 'imdb'"):
    tasks.build(c)


@pytest.mark.parametrize('name', sorted(methods.REGISTRY))
def test_the_config_argument_switches_the_method(name):
  c = minilm_vader.get_config(name)
  assert c.method.name == name
  kwargs = {k: v for k, v in c.method.to_dict().items() if k != 'name'}
  assert loop.method_from_config(c.method).config == methods.REGISTRY[name](**kwargs).config


def test_keys_of_another_method_are_a_clear_error():
  c = minilm_vader.get_config('lora')
  c.method.name = 'sorsa'  # LoRA's alpha and dropout stay
  with pytest.raises(ValueError, match=r"method 'sorsa': .*configs/minilm_vader.py:sorsa"):
    loop.method_from_config(c.method)
