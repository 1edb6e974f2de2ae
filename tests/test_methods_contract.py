"""The method contract, checked for every registered method and a chain on a tiny Flax MLP:
unchanged at init (grafting: at its base patch), merge == structured apply (methods that
insert modules: merge refuses), exact file round trips (of what a codec stores), configs that
rebuild the method, unmerge where offered, and shardings derived from the base weights
(inserted modules' weights: replicated)."""
from __future__ import annotations

import functools
import json
import pathlib
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as Spec

import peftjax as pj
from peftjax.core import calib as C
from peftjax.core import paths as P
from peftjax.core.adapter import describe_targets
from peftjax.core.leaves import LowRank, is_structured
from peftjax.io.adapter_file import load_adapter, save_adapter
from peftjax.io.params_file import save_params
from peftjax.methods import REGISTRY
from peftjax.methods.s2ft import unpermute
from peftjax.models.bert import Dense
from peftjax.parallel import sharding as PS
from peftjax.parallel.mesh import make_mesh

# Every kernel dimension (8, 12, 6) differs from every rank, so each leaf's dimensions say
# which of the weight's they are.
CASES = {
    'lora': lambda: pj.lora('kernel', rank=2, alpha=6.0, dropout=0.1, init_a='gaussian',
                            rank_pattern={'down': 3}, alpha_pattern={'up': 3.0}),
    'rslora': lambda: pj.rslora('kernel', rank=3, alpha=5.0, rank_pattern={'up': 2}),
    'lora_pro': lambda: pj.lora_pro('kernel', rank=2, alpha=4.0, x_mode='zero', damping=1e-6),
    'full': lambda: pj.full(['down/', 'up/bias']),
    'probe': pj.probe,
    'pissa': lambda: pj.pissa('kernel', rank=2, alpha=6.0, niter=2, seed=3, dropout=0.1,
                              rank_pattern={'down': 3}),
    'milora': lambda: pj.milora('kernel', rank=2, alpha=2.0),
    'soma': lambda: pj.soma('down/kernel', rank=3, alpha=9.0),
    'sorsa': lambda: pj.sorsa('kernel', rank=2, gamma=0.1, rank_pattern={'down': 3}),
    'svfit': lambda: pj.svfit('kernel', rank=None, energy=0.5),
    'loldu': lambda: pj.loldu('kernel', rank=3, alpha=6.0, rank_pattern={'down': 2}),
    'soka': lambda: pj.soka('kernel', 'energy', energy=0.8, max_rank=3),
    'corda': lambda: pj.corda('kernel', rank=2, mode='ipm', alpha=4.0, damping=0.05,
                              dropout=0.1, rank_pattern={'down': 3}),
    'eva': lambda: pj.eva('kernel', rank=2, rho=1.5, alpha=8.0, whiten=True,
                          adjust_scaling_factors=True),
    'lora_ga': lambda: pj.lora_ga('kernel', rank=2, alpha=8.0, direction='A2rBr',
                                  stable_gamma=4.0, rslora=True, rank_pattern={'down': 3}),
    'sparse_ft': lambda: pj.sparse_ft('kernel', density=0.2, select='magnitude', l1=0.1),
    # The MLP as one block (the empty prefix) whose category holds both layers: one trains.
    'hft': lambda: pj.hft(blocks='^', categories={'mlp': '^(?:up|down)/'}, seed=3),
    # down/kernel switches to LoRA (36 entries), up/kernel keeps 4 sensitive entries.
    'spt': lambda: pj.spt('kernel', budget=40, threshold=0.5, rank=2, dropout=0.1),
    'mask_tuning': lambda: pj.mask_tuning(['kernel', 'down/bias'], scale=0.05, threshold=0.01,
                                          temperature=2.0, alpha=0.5, reg=1e-3),
    'graft': lambda: pj.graft('kernel', str(finetuned_file()), sparsity=0.25, sigmoid_bias=12.0,
                              l1=1e-3),
    's2ft': lambda: pj.s2ft(layout={'up': 'up', 'down': 'down'}, o_ratio=0.0, u_ratio=0.34,
                            d_ratio=0.25, seed=3),
    'sara': lambda: pj.sara('kernel', threshold=0.2, lambda_rank=0.01, rank_min_dim=0),
    'adapter': lambda: pj.bottleneck_adapter(['^up$', '^down$'], size=5, placement='parallel',
                                             residual=False, activation='relu', scale=2.0),
    'mosa': lambda: pj.mosa('^up$', size=4, modules=4, active=2, seed=3, activation='tanh'),
    'ssf': lambda: pj.ssf('kernel'),
    'ia3': lambda: pj.ia3('up/kernel', feedforward='down/kernel'),
    'bitfit': pj.bitfit,
    'ln_tuning': lambda: pj.ln_tuning('bias'),  # the MLP has no norm: its biases stand in
    # The batch [16, 8] is one sequence of 16 tokens to a prompt.
    'vpt': lambda: pj.vpt('^up$', length=2, fan_in=5, dropout=0.1),
    'dvpt': lambda: pj.dvpt(['^up$', '^down$'], length=2, size=3),
    # The side network reads up's output and fuses into down's (16 tokens of one sequence).
    'side': lambda: pj.side('^up$', output='^down$', size=3, widths={'^up$': 12}),
    # init_scale=0 keeps LoRA's zero B (the official small random start changes outputs).
    'low_precision': lambda: pj.low_precision(pj.lora('kernel', rank=2, alpha=4.0), bits=2,
                                              init_scale=0.0),
    'chain': lambda: pj.chain(pj.pissa('up/kernel', rank=2, alpha=4.0),
                              pj.lora('kernel', rank=2, alpha=3.0)),
}
NOT_INVERTIBLE = {'svfit', 'loldu', 'corda', 'lora_ga', 'sparse_ft', 'spt', 'mask_tuning',
                  'graft', 'sara'}
# Methods that insert modules around the model's calls: no merged tree, no unmerge.
INSERTS_MODULES = {'adapter', 'mosa', 'vpt', 'dvpt', 'side'}
# Prompts change only what mixes tokens; the MLP mixes none (tests/test_methods_prompts.py).
TOKEN_PROMPTS = {'vpt', 'dvpt'}
# Methods that re-base the frozen tree on a co-permutation of the weights (the same function):
# this brings their merged tree back to the base's order.
PERMUTING = {'s2ft': unpermute}
AXES = PS.axes_from_table([('up/kernel', ('embed', 'mlp')), ('up/bias', ('mlp',)),
                           ('down/kernel', ('mlp', 'embed')), ('down/bias', ('embed',))])


class MLP(nn.Module):
  """up (8, 12), tanh, down (12, 6); `Dense` runs structured kernels too."""

  @nn.compact
  def __call__(self, x):
    return Dense(6, name='down')(jnp.tanh(Dense(12, name='up')(x)))


@functools.lru_cache(maxsize=None)
def finetuned_file() -> pathlib.Path:
  """A "fine-tuned" MLP (the params moved everywhere) as a params file, for grafting."""
  params, _, _ = model()
  rng = np.random.default_rng(1)
  moved = jax.tree.map(lambda x: x + jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype),
                       params)
  return save_params(pathlib.Path(tempfile.mkdtemp()) / 'finetuned.safetensors', moved)


def forward(params, batch):
  return pj.apply(MLP(), params, batch['x'])


def loss_fn(params, batch):
  return jnp.mean((forward(params, batch) - batch['y']) ** 2)


@functools.lru_cache(maxsize=None)
def model():
  """Params of unit-scale rows, three batches and a Calibration on them."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  batches = [{'x': normal(16, 8), 'y': normal(16, 6)} for _ in range(3)]
  shapes = MLP().init(jax.random.key(0), batches[0]['x'])['params']
  params = jax.tree.map(lambda x: normal(*x.shape) / np.sqrt(x.shape[0]), shapes)
  return params, batches, C.Calibration(forward, params, batches, loss_fn=loss_fn)


@functools.lru_cache(maxsize=None)
def initialised(name):
  adapter = CASES[name]()
  params, _, cal = model()
  return adapter, *adapter.init(jax.random.key(1), params, calib=cal)


def trained(state, seed=5, std=0.1):
  """The state moved in every leaf, as after training."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda l: l + jnp.asarray(std * rng.standard_normal(l.shape), l.dtype),
                      state)


def assert_same(x, y):
  """Equal trees, structured leaves included (their arrays, scale and dropout)."""
  leaves = lambda t: jax.tree.leaves(t, is_leaf=is_structured)
  assert jax.tree.structure(x) == jax.tree.structure(y)
  for a, b in zip(leaves(x), leaves(y)):
    assert type(a) is type(b)
    if isinstance(a, LowRank):
      assert (a.scale, a.dropout) == (b.scale, b.dropout)
  jax.tree.map(np.testing.assert_array_equal, x, y)


def test_every_registered_method_has_a_case():
  assert set(CASES) == set(REGISTRY) | {'chain'}


@pytest.mark.parametrize('name', list(CASES))
def test_outputs_are_unchanged_at_init(name):
  adapter, frozen, state = initialised(name)
  params, batches, _ = model()
  base, out = forward(params, batches[0]), forward(adapter.apply(frozen, state), batches[0])
  if name in TOKEN_PROMPTS:  # the same per-token values, computed among more rows
    np.testing.assert_allclose(out, base, rtol=1e-6, atol=1e-6)
    return
  if name in INSERTS_MODULES:
    np.testing.assert_array_equal(out, base)
    return
  merged = pj.merge(adapter, frozen, state)
  if name == 'graft':  # starts at its base patch: the binary graft it rounds to, within 1e-4
    patch, used = pj.binarized_graft(adapter, frozen, state)
    assert used == pytest.approx(0.25, abs=0.01)
    np.testing.assert_allclose(out, forward(patch, batches[0]), atol=1e-3)
    assert float(jnp.abs(out - base).max()) > 1e-2
    return
  flat_f, flat_p = P.flatten(frozen), P.flatten(params)
  if all(flat_f.get(p) is leaf for p, leaf in flat_p.items() if p in flat_f):  # not re-based
    np.testing.assert_array_equal(out, base)
    jax.tree.map(np.testing.assert_array_equal, merged, params)
  else:  # re-based on a residual or a permutation: the merged weights are the original ones
    if name in PERMUTING:
      merged = PERMUTING[name](adapter, merged)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), merged, params)
    np.testing.assert_allclose(out, base, atol=1e-5)


@pytest.mark.parametrize('name', list(CASES))
def test_merge_equals_the_structured_apply(name):
  adapter, frozen, state = initialised(name)
  params, batches, _ = model()
  state = trained(state)
  if name in INSERTS_MODULES:
    with pytest.raises(pj.NotMergeableError, match=f"'{name}' inserts modules"):
      pj.merge(adapter, frozen, state)
    structured = forward(adapter.apply(frozen, state), batches[1])
    if name in TOKEN_PROMPTS:
      np.testing.assert_allclose(structured, forward(params, batches[1]), rtol=1e-6, atol=1e-6)
      return
    assert float(jnp.abs(structured - forward(params, batches[1])).max()) > 1e-3
    return
  merged = pj.merge(adapter, frozen, state)
  assert not any(map(is_structured, jax.tree.leaves(merged, is_leaf=is_structured)))
  structured = forward(adapter.apply(frozen, state), batches[1])
  np.testing.assert_allclose(forward(merged, batches[1]), structured, rtol=1e-5, atol=1e-5)
  if state:
    assert float(jnp.abs(structured - forward(params, batches[1])).max()) > 1e-3


@pytest.mark.parametrize('name', list(CASES))
def test_save_load_round_trip_is_exact(name, tmp_path):
  adapter, frozen, state = initialised(name)
  params, _, _ = model()
  state = trained(state)
  save_adapter(tmp_path, adapter, frozen, state, base_model='tiny')
  loaded, frozen2, state2, head, meta = load_adapter(tmp_path, params, rng=jax.random.key(9))
  assert loaded.config == adapter.config == meta['method'] and head is None
  if adapter.codec is not None:  # the file holds the encoding: that round trip is exact
    assert_same(adapter.codec.encode(state2), adapter.codec.encode(state))
    assert_same(adapter.codec.decode(adapter.codec.encode(state), state), state2)
  else:
    assert_same(state2, state)
  assert_same(frozen2, frozen)
  assert_same(loaded.apply(frozen2, state2), adapter.apply(frozen, state))


@pytest.mark.parametrize('name', list(CASES))
def test_config_is_json_and_rebuilds_an_equivalent_method(name):
  adapter, frozen, state = initialised(name)
  params, _, cal = model()
  config = json.loads(json.dumps(adapter.config))
  assert config == adapter.config
  rebuilt = pj.from_config(config)
  assert rebuilt.config == adapter.config
  for field in ('loss', 'tx', 'unmerge', 'describe', 'codec', 'guide'):
    assert (getattr(rebuilt, field) is None) == (getattr(adapter, field) is None), field
  frozen2, state2 = rebuilt.init(jax.random.key(1), params, calib=cal)
  assert_same((frozen2, state2), (frozen, state))
  state = trained(state)
  assert_same(rebuilt.apply(frozen2, state), adapter.apply(frozen, state))
  assert describe_targets(rebuilt, frozen2, state) == describe_targets(adapter, frozen, state)


@pytest.mark.parametrize('name', list(CASES))
def test_describe_counts_the_state(name):
  adapter, frozen, state = initialised(name)
  info = describe_targets(adapter, frozen, state)
  assert json.loads(json.dumps(info)) == info  # adapter files store it
  assert sum(row['trainable'] for row in info.values()) == pj.num_params(state)


@pytest.mark.parametrize('name', list(CASES))
def test_unmerge_inverts_merge_where_offered(name):
  adapter, frozen, state = initialised(name)
  state = trained(state)
  if name in INSERTS_MODULES:
    assert adapter.unmerge is None
    return
  merged = pj.merge(adapter, frozen, state)
  if name in NOT_INVERTIBLE:
    assert adapter.unmerge is None
    with pytest.raises(NotImplementedError, match='cannot be unmerged'):
      pj.unmerge(adapter, merged, state)
    return
  restored = pj.unmerge(adapter, merged, state)
  assert jax.tree.structure(restored) == jax.tree.structure(frozen)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), restored, frozen)


def derived_spec(path, shape, spec, base_shape, mesh):
  """Each dimension of the weight's size there sharded like the weight's, any other (a rank)
  not; a sparse selection's entries (1-D index / values) split over the weight's mesh axes
  that divide their count; a vector over one of the weight's axes (SSF, (IA)³) like that
  axis (the out axis where both fit); leaves of another rank (singular values, scalars,
  Kronecker factors) replicated."""
  if len(shape) == 1 and path.rsplit('/', 1)[-1] in ('index', 'values'):
    axes, size = [], 1
    for a in (a for part in spec if part for a in ((part,) if isinstance(part, str) else part)):
      if shape[0] % (size * mesh.shape[a]) == 0:
        axes.append(a)
        size *= mesh.shape[a]
    return Spec(tuple(axes) if len(axes) > 1 else axes[0] if axes else None)
  if len(shape) == 1 and shape[0] in base_shape:  # a per-feature vector: that axis, out first
    return Spec(spec[max(i for i, n in enumerate(base_shape) if n == shape[0])])
  if len(shape) != len(base_shape):
    return Spec()
  return Spec(*(s if n == m else None for s, n, m in zip(spec, shape, base_shape)))


@pytest.mark.parametrize('name', list(CASES))
def test_every_state_and_frozen_leaf_shards_like_its_base_weight(name):
  adapter, frozen, state = initialised(name)
  params, _, _ = model()
  mesh = make_mesh(2, 2, 2)
  base = PS.param_specs(params, AXES, mesh)
  assert base['up/kernel'][0] == Spec('fsdp', 'tensor')
  assert base['down/kernel'][0] == Spec('tensor', 'fsdp')
  tree = {'frozen': frozen, 'state': state}
  got = jax.tree_util.tree_leaves_with_path(PS.shardings(tree, base, mesh))
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  assert len(got) == len(leaves)
  for (key_path, leaf), (_, sharding) in zip(leaves, got):
    path = P.path_str(key_path)
    owner = [p for p in base if f'/{p}/' in f'/{path}/']
    if name in INSERTS_MODULES and path.startswith('state/'):  # a module's, not a weight's
      assert not owner and sharding.is_fully_replicated, (path, sharding.spec)
      continue
    assert len(owner) == 1, path
    want = NamedSharding(mesh, derived_spec(path, leaf.shape, *base[owner[0]], mesh))
    assert sharding.is_equivalent_to(want, leaf.ndim), (path, leaf.shape, sharding.spec)
    jax.device_put(leaf, sharding)  # a valid placement
