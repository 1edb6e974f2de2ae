"""The ViT: patch embedding as a strided convolution, shapes, pooling, methods through the
structured-leaf path, sharding specs, and the pretrained checkpoint's save/load."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import peftjax as pj
from peftjax.core import leaves
from peftjax.models import TINY_VIT, build, vit
from peftjax.parallel import sharding as PS
from peftjax.parallel.mesh import make_mesh

SIZES = {k: v for k, v in TINY_VIT.items() if k != 'name'}


def _images(n=3, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, 28, 28, 1), minval=-1.0, maxval=1.0)


@pytest.fixture(scope='module')
def model():
  return build(ml_collections.ConfigDict(TINY_VIT))


def _jitted(model):
  """`model.apply` compiled (eager applies compile every op of every new shape)."""
  return jax.jit(lambda params, x, tokens=False: model.apply(params, x, tokens=tokens),
                 static_argnames='tokens')


def test_patches_equal_a_strided_convolution():
  """A Dense on `patches` is the ViT paper's patch embedding: a conv with stride = kernel."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 12, 8, 3)).astype(np.float32)
  kernel = rng.normal(size=(4, 4, 3, 5)).astype(np.float32)  # HWIO
  conv = jax.lax.conv_general_dilated(images, kernel, (4, 4), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  dense = vit.patches(images, 4) @ kernel.reshape(-1, 5)
  np.testing.assert_allclose(dense, conv.reshape(2, -1, 5), rtol=1e-5, atol=1e-5)


def test_shapes_and_pooling(model):
  x = _images()
  apply = _jitted(model)
  tokens = apply(model.params, x, tokens=True)
  assert tokens.shape == (3, 16, 16)
  np.testing.assert_allclose(apply(model.params, x), tokens.mean(1), atol=1e-6)
  cls = vit.init(vit.ViTConfig(**{**SIZES, 'pool': 'cls'}))
  assert cls.params['embeddings']['position'].shape == (1, 17, 16)
  apply = _jitted(cls)
  cls_tokens = apply(cls.params, x, tokens=True)
  assert cls_tokens.shape == (3, 17, 16)
  np.testing.assert_array_equal(apply(cls.params, x), cls_tokens[:, 0])


def test_bad_inputs_and_configs(model):
  with pytest.raises(ValueError, match=r'expects images \[batch, 28, 28, 1\], got shape '
                     r'\(2, 28, 28\)'):
    model.apply(model.params, jnp.zeros((2, 28, 28)))
  with pytest.raises(ValueError, match='not divisible by patch_size 5'):
    vit.ViTConfig(patch_size=5)
  with pytest.raises(ValueError, match="pool 'max'"):
    vit.ViTConfig(pool='max')


def test_remat_changes_nothing(model):
  again = vit.init(vit.ViTConfig(**SIZES), remat=True)
  x = _images()
  loss = lambda m: jax.jit(jax.grad(lambda p: jnp.sum(m.apply(p, x) ** 2)))(model.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               loss(model), loss(again))


@pytest.mark.parametrize('method', [
    {'method': 'lora', 'targets': ('patch/kernel', 'encoder/.*/kernel'), 'rank': 2},
    {'method': 'sparse_ft', 'targets': ('encoder/.*/kernel',), 'density': 0.1,
     'per_matrix': True},
])
def test_methods_run_through_structured_leaves(model, method):
  adapter = pj.from_config(method)
  frozen, state = adapter.init(jax.random.key(1), model.params)
  keys = iter(jax.random.split(jax.random.key(2), 1000))
  state = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(next(keys), v.shape, v.dtype),
                       state)
  applied = adapter.apply(frozen, state)
  structured = [x for x in jax.tree.leaves(applied, is_leaf=leaves.is_structured)
                if leaves.is_structured(x)]
  assert len(structured) == (13 if method['method'] == 'lora' else 12)
  x, apply = _images(), _jitted(model)
  out = apply(applied, x)
  merged = apply(pj.merge(adapter, frozen, state), x)
  np.testing.assert_allclose(out, merged, rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, apply(model.params, x), atol=1e-3)


def test_every_param_has_a_sharding_spec(model):
  specs = PS.param_specs(model.params, model.logical_axes, make_mesh(2, 2, 2))
  assert specs['embeddings/patch/kernel'][0] == P(None, 'fsdp')
  assert specs['embeddings/position'][0] == P(None, None, 'fsdp')
  assert specs['encoder/layer_0/attention/query/kernel'][0] == P('fsdp', 'tensor')
  assert specs['encoder/layer_0/attention/output/kernel'][0] == P('tensor', 'fsdp')
  assert specs['encoder/layer_1/intermediate/kernel'][0] == P('fsdp', 'tensor')
  assert specs['encoder/layer_1/output/kernel'][0] == P('tensor', 'fsdp')
  assert specs['encoder/norm/scale'][0] == P(None)
  cls = vit.ViT(vit.ViTConfig(**{**SIZES, 'pool': 'cls'}))
  shapes = jax.eval_shape(cls.init, jax.random.key(0), _images(1))['params']
  assert PS.param_specs(shapes, cls.logical_axes, make_mesh(2, 2, 2))[
      'embeddings/cls'][0] == P(None, None, 'fsdp')


def test_pretrained_checkpoint_round_trip(tmp_path, monkeypatch, model):
  monkeypatch.setenv('PEFTJAX_CACHE', str(tmp_path))
  config = ml_collections.ConfigDict({'name': 'vit', 'checkpoint': 'toy'})
  with pytest.raises(FileNotFoundError, match='make it with: python -m experiments.pretrain_vit'):
    build(config)
  head = {'kernel': np.ones((16, 10), np.float32), 'bias': np.arange(10, dtype=np.float32)}
  vit.save_pretrained(vit.checkpoint_dir('toy'), model.module.config, model.params, head,
                      {'num_classes': 10, 'note': 'toy'})
  assert json.loads((tmp_path / 'vit' / 'toy' / 'config.json').read_text())['vit'] == {
      **vit.ViTConfig().__dict__, **SIZES}
  loaded = build(config)
  assert loaded.model_id.startswith('peftjax-vit-toy-') and len(loaded.model_id) == 28
  jax.tree.map(np.testing.assert_array_equal, loaded.params, model.params)
  _, loaded_head = vit.load_pretrained('toy', with_head=True)
  jax.tree.map(np.testing.assert_array_equal, loaded_head, head)
  with pytest.raises(ValueError, match='fixes the ViT\'s sizes; got sizes as well'):
    build(ml_collections.ConfigDict({**config, 'hidden_size': 32}))
