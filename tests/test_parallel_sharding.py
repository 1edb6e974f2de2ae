"""Logical-axis rules for the bundled BERT, and adapter / optimiser leaves that inherit the
sharding of their base weight, on 8 fake CPU devices."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from peftjax import methods
from peftjax.core import paths
from peftjax.core.calib import CalibratedResidual
from peftjax.core.leaves import LowRank, SparseDelta
from peftjax.models import TINY_BERT, build
from peftjax.parallel import sharding as PS
from peftjax.parallel.mesh import make_mesh
from peftjax.tasks.classification import init_head
from peftjax.train.loop import place

Q = 'encoder/layer_0/attention/query/kernel'
O = 'encoder/layer_1/attention/output/kernel'
FF_OUT = 'encoder/layer_1/output/kernel'


@pytest.fixture(scope='module')
def model():
  return build(ml_collections.ConfigDict(TINY_BERT))


@pytest.fixture(scope='module')
def mesh():
  return make_mesh(2, 2, 2)


def test_every_bert_param_has_logical_axes(model, mesh):
  specs = PS.param_specs(model.params, model.logical_axes, mesh)
  assert specs[Q][0] == P('fsdp', 'tensor')
  assert specs[O][0] == P('tensor', 'fsdp')
  assert specs[FF_OUT][0] == P('tensor', 'fsdp')
  assert specs['encoder/layer_0/intermediate/kernel'][0] == P('fsdp', 'tensor')
  assert specs['embeddings/word/embedding'][0] == P('tensor', 'fsdp')
  assert specs['encoder/layer_0/output_norm/scale'][0] == P(None)
  with pytest.raises(ValueError, match="no logical axes for param 'pooler/kernel'"):
    model.logical_axes('pooler/kernel')


def test_rules_drop_axes_that_do_not_divide(mesh):
  assert PS.logical_to_spec(('embed', 'mlp'), (5, 64), mesh) == P(None, 'tensor')
  assert PS.logical_to_spec(('batch', None), (8, 3), mesh) == P(('data', 'fsdp'), None)
  assert PS.logical_to_spec(('batch', None), (2, 3), mesh) == P('data', None)
  one = make_mesh(1)
  assert PS.logical_to_spec(('embed', 'heads'), (32, 32), one) == P(None, None)
  with pytest.raises(ValueError, match="logical axis 'experts' has no rule"):
    PS.logical_to_spec(('experts',), (8,), mesh)
  with pytest.raises(ValueError, match='do not fit an array of shape'):
    PS.logical_to_spec(('embed',), (8, 8), mesh)


def test_lora_factors_and_adam_moments_inherit_base_sharding(model, mesh):
  adapter = methods.lora(['encoder/.*/kernel'], rank=4)
  frozen, state = adapter.init(jax.random.key(0), model.params)
  tx = optax.adamw(1e-3)
  head = init_head(jax.random.key(1), 32, 2)
  placed, frozen_dev, _, _ = place(model, frozen, {'adapter': state, 'head': head}, tx, mesh)
  lora = placed.trainable['adapter']
  assert lora[Q]['a'].sharding.spec == P('fsdp', None)      # in axis of (embed, heads)
  assert lora[Q]['b'].sharding.spec == P(None, 'tensor')    # out axis, rank unsharded
  assert lora[O]['a'].sharding.spec == P('tensor', None)
  assert lora[O]['b'].sharding.spec == P(None, 'fsdp')
  mu = placed.opt_state[0].mu['adapter']
  assert mu[FF_OUT]['a'].sharding.spec == P('tensor', None)
  assert mu[FF_OUT]['b'].sharding.spec == P(None, 'fsdp')
  assert placed.opt_state[0].count.sharding.spec == P()
  assert placed.trainable['head']['kernel'].sharding.spec == P()
  assert frozen_dev['encoder']['layer_0']['attention']['query']['kernel'].sharding.spec == \
      P('fsdp', 'tensor')
  # The placed values are the host values.
  np.testing.assert_array_equal(np.asarray(lora[Q]['a']), np.asarray(state[Q]['a']))


def test_full_fine_tuning_state_shards_like_the_base(model, mesh):
  adapter = methods.full()
  frozen, state = adapter.init(jax.random.key(0), model.params)
  placed, *_ = place(model, frozen, {'adapter': state, 'head': {}}, optax.adam(1e-3), mesh)
  assert placed.trainable['adapter'][Q].sharding.spec == P('fsdp', 'tensor')
  assert placed.opt_state[0].nu['adapter'][O].sharding.spec == P('tensor', 'fsdp')


def test_structured_leaves_and_vectors_inherit(mesh):
  base = {Q: (P('fsdp', 'tensor'), (32, 48))}
  tree = {'frozen': {Q: LowRank(jnp.zeros((32, 48)), jnp.zeros((32, 4)), jnp.zeros((4, 48)),
                                1.0)},
          'svd': {Q: {'u': jnp.zeros((32, 4)), 's': jnp.zeros(4), 'vt': jnp.zeros((4, 48))}},
          'ssf': {Q: {'scale': jnp.zeros(48), 'shift_in': jnp.zeros(32)}},
          'chain': ({Q: {'a': jnp.zeros((32, 4))}},),
          'calibrated': {Q: CalibratedResidual(jnp.zeros((32, 48)), jnp.zeros((32, 4)),
                                               jnp.zeros((4, 48)))},
          'any_key': {Q: {'left': jnp.zeros((32, 4)), 'right': jnp.zeros((4, 48)),
                          'moment': jnp.zeros((32, 48)), 'kron': jnp.zeros((4, 4, 6))}}}
  specs = {paths.path_str(path): s.spec for path, s in
           jax.tree_util.tree_leaves_with_path(PS.shardings(tree, base, mesh))}
  assert specs[f'frozen/{Q}/w'] == P('fsdp', 'tensor')
  assert specs[f'frozen/{Q}/a'] == P('fsdp', None)
  assert specs[f'frozen/{Q}/b'] == P(None, 'tensor')
  assert specs[f'svd/{Q}/u'] == P('fsdp', None)
  assert specs[f'svd/{Q}/s'] == P()
  assert specs[f'svd/{Q}/vt'] == P(None, 'tensor')
  assert specs[f'ssf/{Q}/scale'] == P('tensor')
  assert specs[f'ssf/{Q}/shift_in'] == P('fsdp')
  assert specs[f'chain/0/{Q}/a'] == P('fsdp', None)
  # CorDA's and LoRA-GA's frozen factors, and factors under any key: sharded by their shape.
  assert specs[f'calibrated/{Q}/w'] == P('fsdp', 'tensor')
  assert specs[f'calibrated/{Q}/a'] == P('fsdp', None)
  assert specs[f'calibrated/{Q}/b'] == P(None, 'tensor')
  assert specs[f'any_key/{Q}/left'] == P('fsdp', None)
  assert specs[f'any_key/{Q}/right'] == P(None, 'tensor')
  assert specs[f'any_key/{Q}/moment'] == P('fsdp', 'tensor')
  assert specs[f'any_key/{Q}/kron'] == P()



def test_sparse_entries_split_over_the_params_mesh_axes(mesh):
  """A selection's 1-D index and values (frozen leaf, state, optimiser moments) spread over
  the param's mesh axes that divide the count; row selections keep the rank rule."""
  base = {Q: (P('fsdp', 'tensor'), (32, 48))}
  idx = jnp.arange(8, dtype=jnp.int32)
  tree = {'frozen': {Q: SparseDelta(jnp.zeros((32, 48)), idx, jnp.zeros(8))},
          'state': {Q: {'values': jnp.zeros(8)}},
          'odd': {Q: {'values': jnp.zeros(6)}},
          'rows': {Q: SparseDelta(jnp.zeros((32, 48)), idx[:3], jnp.zeros((3, 48)), 0)},
          'vector': {Q: jnp.zeros(48)}}
  specs = {paths.path_str(path): s.spec for path, s in
           jax.tree_util.tree_leaves_with_path(PS.shardings(tree, base, mesh))}
  both = P(('fsdp', 'tensor'))
  assert specs[f'frozen/{Q}/w'] == P('fsdp', 'tensor')
  assert specs[f'frozen/{Q}/index'] == specs[f'frozen/{Q}/values'] == both
  assert specs[f'state/{Q}/values'] == both
  assert specs[f'odd/{Q}/values'] == P('fsdp')  # 6 entries: only the axis of size 2 divides
  assert specs[f'rows/{Q}/values'] == P(None, 'tensor')
  assert specs[f'vector/{Q}'] == P('tensor')  # a plain vector still follows the out axis


def test_a_model_without_logical_axes_is_replicated_with_a_warning(model, mesh, caplog):
  specs = PS.param_specs(model.params, None, mesh)
  assert set(specs) == set(paths.flatten(model.params))
  assert all(spec == P() for spec, _ in specs.values())
  assert 'names no logical axes' in caplog.text and 'axes_from_table' in caplog.text
  caplog.clear()
  PS.param_specs(model.params, None, make_mesh(8, 1, 1))  # data parallel: nothing to say
  assert not caplog.text
