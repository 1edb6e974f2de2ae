"""Adapter files: exact round trips, adapter-only contents, clear errors, atomic writes."""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import peftjax as pj
from peftjax.core import paths as P
from peftjax.io import adapter_file
from peftjax.io.adapter_file import AdapterFileError, load_adapter, load_head, save_adapter
from peftjax.models.bert import Bert, BertConfig


def params(seed, width=16, out=12, layers=2):
  keys = iter(jax.random.split(jax.random.key(seed), 4 * layers))
  return {'enc': {f'layer_{i}': {
      'query': {'kernel': jax.random.normal(next(keys), (width, out)),
                'bias': jax.random.normal(next(keys), (out,))},
      'value': {'kernel': jax.random.normal(next(keys), (width, out))},
      'norm': {'scale': jax.random.normal(next(keys), (out,))}} for i in range(layers)}}


def head(seed, width=12):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {'kernel': jax.random.normal(k1, (width, 3)), 'bias': jax.random.normal(k2, (3,))}


def trained(adapter, p, seed):
  """`init` followed by random values in every state leaf (as after training)."""
  frozen, state = adapter.init(jax.random.key(seed), p)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1), max(len(leaves), 1))
  return frozen, jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape, l.dtype)
                                              for k, l in zip(keys, leaves)])


def nbytes(tree):
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def leftovers(folder):
  return sorted(f.name for f in folder.iterdir() if f.name.startswith('.'))


METHODS = {
    'lora': lambda: pj.lora('kernel', rank=2, alpha=4, rank_pattern={'value': 3}),
    'rslora': lambda: pj.rslora('query/kernel', rank=4, alpha_pattern={'layer_1': 2.0}),
    'full': lambda: pj.full(['bias', 'norm']),
    'probe': pj.probe,
    'chain': lambda: pj.chain(pj.lora('query/kernel', rank=2), pj.lora('kernel', rank=1),
                              pj.full(['layer_1/norm'])),
}


@pytest.mark.parametrize('name', list(METHODS))
@pytest.mark.parametrize('seed', [0, 1])
def test_round_trip_is_exact(tmp_path, name, seed):
  adapter, p, h = METHODS[name](), params(seed), head(seed + 50)
  frozen, state = trained(adapter, p, seed)
  save_adapter(tmp_path / 'a', adapter, frozen, state, head=h, base_model='tiny/base')
  loaded, frozen2, state2, head2, meta = load_adapter(tmp_path / 'a', p)
  assert jax.tree.structure(state2) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, state2, state)
  jax.tree.map(np.testing.assert_array_equal, head2, h)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves((state2, head2)))
  jax.tree.map(np.testing.assert_array_equal, frozen2, frozen)
  assert loaded.config == adapter.config == meta['method']
  assert meta['base_model'] == 'tiny/base'
  jax.tree.map(np.testing.assert_array_equal, pj.merge(loaded, frozen2, state2),
               pj.merge(adapter, frozen, state))
  if name != 'probe':
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, pj.merge(adapter, frozen, state),
                                                p)))


def test_loaded_lora_runs_a_bert_identically(tmp_path):
  cfg = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
  k1, k2 = jax.random.split(jax.random.key(3))
  ids = jax.random.randint(k2, (3, 7), 1, cfg.vocab_size)
  mask = jnp.ones_like(ids)
  p = Bert(cfg).init(k1, ids, mask)['params']
  adapter = pj.lora('attention/(query|value)/kernel', rank=2, alpha=8)
  frozen, state = trained(adapter, p, 3)
  save_adapter(tmp_path / 'bert', adapter, frozen, state, base_model='tiny-bert')
  loaded, frozen2, state2, head2, _ = load_adapter(tmp_path / 'bert', p)
  assert head2 is None
  run = lambda a, f, s: Bert(cfg).apply({'params': a.apply(f, s)}, ids, mask)
  np.testing.assert_array_equal(run(loaded, frozen2, state2), run(adapter, frozen, state))
  weights = tmp_path / 'bert' / adapter_file.WEIGHTS_FILE
  assert weights.stat().st_size < nbytes(p) / 10


@pytest.mark.parametrize('seed', [0, 1])
def test_file_holds_only_the_adapter_and_its_description(tmp_path, seed):
  p, h = params(seed), head(seed)
  adapter = pj.lora('kernel', rank=2, alpha=4, rank_pattern={'layer_1/value': 3})
  frozen, state = trained(adapter, p, seed)
  weights = save_adapter(tmp_path / 'a', adapter, frozen, state, head=h, base_model='m/x')
  assert weights == tmp_path / 'a' / adapter_file.WEIGHTS_FILE
  assert sorted(f.name for f in (tmp_path / 'a').iterdir()) == sorted(
      [adapter_file.WEIGHTS_FILE, adapter_file.CONFIG_FILE])
  tensors = safetensors.numpy.load_file(str(weights))
  assert all(k.startswith(('state/', 'head/')) for k in tensors)
  assert sorted(tensors) == sorted([f'state/{k}' for k in P.flatten(state)]
                                   + [f'head/{k}' for k in P.flatten(h)])
  payload = nbytes(state) + nbytes(h)
  assert payload == sum(v.nbytes for v in tensors.values())
  assert payload < weights.stat().st_size <= payload + 128 * len(tensors)
  assert weights.stat().st_size < nbytes(p)

  meta = json.loads((tmp_path / 'a' / adapter_file.CONFIG_FILE).read_text())
  assert meta['format'] == 'peftjax-adapter' and meta['version'] == 1
  assert meta['method'] == adapter.config and meta['base_model'] == 'm/x'
  assert sorted(meta['targets']) == sorted(state)
  for path, info in meta['targets'].items():
    r = 3 if 'layer_1/value' in path else 2
    assert info == {'shape': [16, 12], 'trainable': r * (16 + 12), 'rank': r,
                    'scale': pytest.approx(4 / r)}
  assert meta['tensors'] == {k: {'shape': list(v.shape), 'dtype': str(v.dtype)}
                             for k, v in tensors.items()}


def test_loading_into_other_shapes_is_a_clear_error(tmp_path):
  cases = {'lora': (pj.lora('kernel', rank=2), 'kernel', (16, 12), (20, 12)),
           'full': (pj.full(['bias']), 'bias', (12,), (7,)),
           'chain': (pj.chain(pj.probe(), pj.lora('query/kernel', rank=2)), 'kernel', (16, 12),
                     (20, 7))}
  for name, (adapter, leaf, trained_shape, held) in cases.items():
    frozen, state = trained(adapter, params(3), 3)
    save_adapter(tmp_path / name, adapter, frozen, state, base_model='small')
    with pytest.raises(AdapterFileError, match=re.escape(
        f'adapter target enc/layer_0/query/{leaf} was trained for shape {trained_shape} but the '
        f'params hold {held} (base model of the file: small)')):
      load_adapter(tmp_path / name, params(3, width=20, out=7 if name != 'lora' else 12))


def test_loading_into_params_without_the_targets_is_a_clear_error(tmp_path):
  adapter = pj.lora('query/kernel', rank=2)
  frozen, state = trained(adapter, params(4), 4)
  save_adapter(tmp_path / 'a', adapter, frozen, state)
  with pytest.raises(AdapterFileError, match=r"does not fit these params.*'query/kernel'"):
    load_adapter(tmp_path / 'a', {'dec': {'key': {'kernel': jnp.ones((16, 12))}}})
  with pytest.raises(AdapterFileError, match=r'enc/layer_1/query/kernel/a: unexpected in file'):
    load_adapter(tmp_path / 'a', params(4, layers=1))


def test_wrong_tensor_shapes_in_the_file_are_named(tmp_path):
  adapter = pj.lora('kernel', rank=2)
  frozen, state = trained(adapter, params(5), 5)
  save_adapter(tmp_path / 'a', adapter, frozen, state)
  weights = tmp_path / 'a' / adapter_file.WEIGHTS_FILE
  tensors = safetensors.numpy.load_file(str(weights))
  tensors['state/enc/layer_0/value/kernel/a'] = np.zeros((16, 7), np.float32)
  del tensors['state/enc/layer_1/query/kernel/b']
  safetensors.numpy.save_file(tensors, str(weights))
  with pytest.raises(AdapterFileError) as info:
    load_adapter(tmp_path / 'a', params(5))
  msg = str(info.value)
  assert 'enc/layer_0/value/kernel/a: expected (16, 2), found (16, 7)' in msg
  assert 'enc/layer_1/query/kernel/b: expected (2, 12), found nothing' in msg


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'empty', 'header'])
def test_corrupt_weights_are_a_clear_error(tmp_path, damage):
  adapter = pj.lora('kernel', rank=2)
  frozen, state = trained(adapter, params(6), 6)
  weights = save_adapter(tmp_path / 'a', adapter, frozen, state)
  data = weights.read_bytes()
  if damage == 'truncate':
    data = data[:len(data) - 40]
  elif damage == 'garbage':
    data = np.asarray(jax.random.bits(jax.random.key(6), (len(data),), jnp.uint8)).tobytes()
  elif damage == 'empty':
    data = b''
  else:
    data = (len(data) * 4).to_bytes(8, 'little') + data[8:]
  weights.write_bytes(data)
  with pytest.raises(AdapterFileError, match=r'cannot read .*adapter\.safetensors'):
    load_adapter(tmp_path / 'a', params(6))


def test_missing_or_invalid_files_are_clear_errors(tmp_path):
  adapter = pj.lora('kernel', rank=2)
  frozen, state = trained(adapter, params(7), 7)
  with pytest.raises(AdapterFileError, match=r'no adapter at .*nothing: adapter_config\.json'):
    load_adapter(tmp_path / 'nothing', params(7))
  save_adapter(tmp_path / 'a', adapter, frozen, state)
  (tmp_path / 'a' / adapter_file.WEIGHTS_FILE).unlink()
  with pytest.raises(AdapterFileError, match='cannot read'):
    load_adapter(tmp_path / 'a', params(7))
  save_adapter(tmp_path / 'b', adapter, frozen, state)
  config = tmp_path / 'b' / adapter_file.CONFIG_FILE
  config.unlink()
  with pytest.raises(AdapterFileError, match='adapter_config.json is missing'):
    load_adapter(tmp_path / 'b', params(7))
  config.write_text('{not json')
  with pytest.raises(AdapterFileError, match='not valid JSON'):
    load_adapter(tmp_path / 'b', params(7))
  config.write_text(json.dumps({'format': 'other'}))
  with pytest.raises(AdapterFileError, match="expected format 'peftjax-adapter', found 'other'"):
    load_adapter(tmp_path / 'b', params(7))


def test_saving_over_an_adapter_replaces_it_whole(tmp_path):
  p = params(8)
  old, new = pj.lora('kernel', rank=2), pj.full(['bias'])
  save_adapter(tmp_path / 'a', old, *trained(old, p, 8), head=head(8))
  frozen, state = trained(new, p, 9)
  save_adapter(tmp_path / 'a', new, frozen, state, base_model='second')
  loaded, _, state2, head2, meta = load_adapter(tmp_path / 'a', p)
  assert loaded.config == new.config and meta['base_model'] == 'second' and head2 is None
  jax.tree.map(np.testing.assert_array_equal, state2, state)
  tensors = safetensors.numpy.load_file(str(tmp_path / 'a' / adapter_file.WEIGHTS_FILE))
  assert sorted(tensors) == [f'state/{k}' for k in sorted(state)]
  assert leftovers(tmp_path) == [] and sorted(f.name for f in tmp_path.iterdir()) == ['a']


@pytest.mark.parametrize('stage', ['weights', 'config'])
def test_a_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch, stage):
  p = params(10)
  adapter = pj.lora('kernel', rank=2)
  frozen, state = trained(adapter, p, 10)
  save_adapter(tmp_path / 'a', adapter, frozen, state, base_model='first')
  before = {f.name: f.read_bytes() for f in (tmp_path / 'a').iterdir()}
  newer = jax.tree.map(lambda x: x + 1, state)
  if stage == 'weights':
    def fail(*args, **kwargs):
      raise OSError('disk full')
    monkeypatch.setattr(safetensors.numpy, 'save_file', fail)
    with pytest.raises(OSError, match='disk full'):
      save_adapter(tmp_path / 'a', adapter, frozen, newer)
  else:  # the weights are written, then the config cannot be serialised
    with pytest.raises(TypeError, match='not JSON serialisable'):
      save_adapter(tmp_path / 'a', adapter, frozen, newer, base_model=object())
  assert {f.name: f.read_bytes() for f in (tmp_path / 'a').iterdir()} == before
  assert sorted(f.name for f in tmp_path.iterdir()) == ['a']
  _, _, state2, _, meta = load_adapter(tmp_path / 'a', p)
  jax.tree.map(np.testing.assert_array_equal, state2, state)
  assert meta['base_model'] == 'first'
  monkeypatch.undo()
  with pytest.raises(TypeError):
    save_adapter(tmp_path / 'fresh', adapter, frozen, newer, base_model=object())
  assert sorted(f.name for f in tmp_path.iterdir()) == ['a']


def test_saved_files_get_the_modes_of_ordinary_files(tmp_path):
  adapter = pj.lora('kernel', rank=2)
  frozen, state = adapter.init(jax.random.key(0), params(0))
  save_adapter(tmp_path / 'out', adapter, frozen, state)
  umask = os.umask(0o022)
  os.umask(umask)
  assert (tmp_path / 'out').stat().st_mode & 0o777 == 0o777 & ~umask
  for f in (tmp_path / 'out').iterdir():
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


@pytest.mark.parametrize('method', [{'method': 'no_such_method'},
                                    {'method': 'lora', 'targets': ['kernel'], 'bogus': 1}])
def test_a_config_naming_an_unknown_method_or_argument_is_a_clear_error(tmp_path, method):
  adapter = pj.lora('kernel', rank=2)
  frozen, state = adapter.init(jax.random.key(0), params(0))
  save_adapter(tmp_path / 'out', adapter, frozen, state)
  config = json.loads((tmp_path / 'out' / adapter_file.CONFIG_FILE).read_text())
  config['method'] = method
  (tmp_path / 'out' / adapter_file.CONFIG_FILE).write_text(json.dumps(config))
  with pytest.raises(AdapterFileError, match='cannot rebuild the method'):
    load_adapter(tmp_path / 'out', params(0))


def test_a_saved_head_loads_only_into_its_shapes(tmp_path):
  p = params(0)
  adapter = pj.lora('kernel', rank=2)
  frozen, state = adapter.init(jax.random.key(0), p)
  save_adapter(tmp_path / 'a', adapter, frozen, state, head=head(1))
  loaded = load_head(tmp_path / 'a', head(2))
  jax.tree.map(np.testing.assert_array_equal, loaded, head(1))
  with pytest.raises(AdapterFileError, match='does not fit this task: expected'):
    load_head(tmp_path / 'a', {'kernel': jnp.zeros((12, 4)), 'bias': jnp.zeros(4)})
  save_adapter(tmp_path / 'b', adapter, frozen, state)
  with pytest.raises(AdapterFileError, match='found no head'):
    load_head(tmp_path / 'b', head(2))
