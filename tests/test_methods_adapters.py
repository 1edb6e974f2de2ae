"""Bottleneck adapters and MoSA (`peftjax.methods.adapters`, `peftjax.methods.mosa`): the
papers' equations against hand-written references, on the bundled BERT and on a model of
stock `flax.linen` layers, neither changed; MoSA's split, per-step draw and merge."""
from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import peftjax as pj
from configs import minilm_vader
from peftjax.core.adapter import inserted_modules
from peftjax.methods.mosa import draw, sparse_modules, split
from peftjax.models.bert import Bert, BertConfig
from peftjax.train.loop import train

D_IN, WIDTH, CLASSES = 6, 8, 3


class Block(nn.Module):
  """An MLP block: no kernel of its own (its widths are given to the methods)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(WIDTH, name='fc2')(nn.gelu(nn.Dense(2 * WIDTH, name='fc1')(x)))


class UserModel(nn.Module):
  """A model of stock layers only, as a user writes one."""

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = nn.Dense(WIDTH, name='embed')(x)
    x = x + Block(name='mlp')(nn.LayerNorm(name='norm')(x))
    x = nn.Dropout(0.3, deterministic=not train)(x)
    return nn.Dense(CLASSES, name='head')(x)


class OneLayer(nn.Module):
  """The adapted layer's output is the model's output (MoSA's merge is linear in it)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(WIDTH, name='layer')(x)


BERT = BertConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2,
                  intermediate_size=24)
HOULSBY = [r'attention/output$', r'layer_\d+/output$']  # after each sub-layer's projection
MLP_WIDTHS = {'mlp$': [WIDTH, WIDTH]}


def normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@functools.lru_cache(maxsize=None)
def user_params(module=UserModel):
  return jax.jit(module().init)(jax.random.key(0), jnp.zeros((1, D_IN)))['params']


@functools.lru_cache(maxsize=None)
def bert_params():
  ids = jnp.ones((1, 5), jnp.int32)
  return jax.jit(Bert(BERT).init)(jax.random.key(0), ids, ids)['params']


def bert_inputs(seed=0):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, BERT.vocab_size, (3, 7)), jnp.int32)
  return ids, jnp.asarray(rng.random((3, 7)) > 0.2, jnp.int32).at[:, 0].set(1)


@jax.jit
def run_bert(params, rng=None, seed=0):
  ids, mask = bert_inputs(seed)
  return pj.apply(Bert(BERT), params, ids, mask, train=rng is not None, rng=rng)


@functools.partial(jax.jit, static_argnames='module')
def run_user(params, x, rng=None, module=UserModel):
  kwargs = {} if module is OneLayer else {'train': rng is not None}
  return pj.apply(module(), params, x, rng=rng, **kwargs)


def moved(state, seed=1, std=0.3):
  """The state moved in every leaf, as after training."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda l: l + jnp.asarray(std * rng.standard_normal(l.shape), l.dtype),
                      state)


ZERO_INIT = {  # the variants whose adapters leave outputs unchanged at init
    'sequential': dict(placement='sequential', residual=True),
    'parallel': dict(placement='parallel', residual=False, scale=4.0),
}


@pytest.mark.parametrize('variant', [*ZERO_INIT, 'mosa'])
def test_zero_init_adapters_leave_outputs_unchanged_on_bert_and_a_user_model(variant):
  make = (functools.partial(pj.mosa, modules=4, active=1) if variant == 'mosa'
          else functools.partial(pj.bottleneck_adapter, **ZERO_INIT[variant]))
  x = normal(0, 4, D_IN)
  models = [(user_params(), ['embed$', 'mlp$'], MLP_WIDTHS, lambda p: run_user(p, x))]
  if variant != 'parallel':  # BERT in training (its dropout and MoSA's draw): Houlsby's places
    models.append((bert_params(), HOULSBY, None, lambda p: run_bert(p, jax.random.key(7))))
  for params, targets, widths, run in models:
    adapter = make(targets, size=5, widths=widths)
    frozen, state = adapter.init(jax.random.key(1), params)
    assert frozen is params and len(state) == (4 if params is bert_params() else 2)
    # Equal up to rounding: the adapted program is another XLA program, whose fusions may
    # round the model's own ops differently (by an ulp, on some CPUs).
    np.testing.assert_allclose(run(adapter.apply(frozen, state)), run(params), rtol=1e-6,
                               atol=1e-6)
    # Trained, the same adapters change the outputs: they run inside the unchanged models.
    adapted = run(adapter.apply(frozen, moved(state)))
    assert float(jnp.abs(adapted - run(params)).max()) > 1e-2
    if params is user_params():  # Linen ignores the inserted key: without the interceptor
      plain = UserModel().apply({'params': adapter.apply(frozen, moved(state))}, x)
      np.testing.assert_allclose(plain, run(params), rtol=1e-6, atol=1e-6)  # it runs unadapted


def reference(params, entry, x, *, placement, residual, scale):
  """UserModel with an adapter around `mlp`, from the papers' equations: A(u) = s·(relu(u
  down + b1) up + b2); sequential y + A(y) (Houlsby), parallel y + A(x) (He et al.), and the
  AST paper's other two: A(y) alone, y + A(x) + x."""
  dense = lambda p, v: v @ p['kernel'] + p['bias']
  h = dense(params['embed'], x)
  n = nn.LayerNorm().apply({'params': params['norm']}, h)
  y = dense(params['mlp']['fc2'], nn.gelu(dense(params['mlp']['fc1'], n)))
  adapt = lambda u: scale * (jax.nn.relu(u @ entry['down'] + entry['down_bias']) @ entry['up']
                             + entry['up_bias'])
  block = {('sequential', True): y + adapt(y), ('sequential', False): adapt(y),
           ('parallel', False): y + adapt(n), ('parallel', True): y + adapt(n) + n}
  return dense(params['head'], h + block[placement, residual])


@pytest.mark.parametrize('placement', ['sequential', 'parallel'])
@pytest.mark.parametrize('residual', [True, False])
def test_each_placement_computes_its_equation(placement, residual):
  adapter = pj.bottleneck_adapter('mlp$', size=3, placement=placement, residual=residual,
                                  activation='relu', scale=2.5, widths=MLP_WIDTHS)
  frozen, state = adapter.init(jax.random.key(2), user_params())
  state = moved(state)
  x = normal(3, 5, D_IN)  # fresh inputs
  got = run_user(adapter.apply(frozen, state), x)
  want = reference(user_params(), state['mlp'], x, placement=placement, residual=residual,
                   scale=2.5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_widths_come_from_the_module_kernel_and_mismatches_name_the_module():
  params = user_params()
  # `embed` maps 6 -> 8: a sequential adapter reads 8, a parallel one 6.
  for placement, width in (('sequential', WIDTH), ('parallel', D_IN)):
    _, state = pj.bottleneck_adapter('embed$', size=2, placement=placement,
                                     residual=False).init(jax.random.key(0), params)
    assert state['embed']['down'].shape == (width, 2) and state['embed']['up'].shape == (2, WIDTH)
  with pytest.raises(ValueError, match='parallel adapter with the residual'):
    pj.bottleneck_adapter('embed$', placement='parallel').init(jax.random.key(0), params)
  with pytest.raises(ValueError, match=r"module mlp .*no 2-D kernel.*widths="):
    pj.bottleneck_adapter('mlp$').init(jax.random.key(0), params)
  with pytest.raises(pj.PatternError, match=r"'attn_out\$' matches no module.*closest"):
    pj.bottleneck_adapter('attn_out$').init(jax.random.key(0), params)
  wrong = pj.bottleneck_adapter('mlp$', widths={'mlp': [WIDTH, 2 * WIDTH]})
  frozen, state = wrong.init(jax.random.key(0), params)
  with pytest.raises(ValueError, match=r'^mlp: its sequential bottleneck adapter reads'):
    run_user(wrong.apply(frozen, state), normal(0, 2, D_IN))
  twice = pj.chain(pj.bottleneck_adapter('embed$'), pj.bottleneck_adapter('embed$'))
  with pytest.raises(ValueError, match='already holds'):
    twice.init(jax.random.key(0), params)
  for bad in (dict(placement='serial'), dict(activation='swish'), dict(size=0),
              dict(init='normal')):
    with pytest.raises(ValueError, match=str(next(iter(bad.values())))):
      pj.bottleneck_adapter('embed$', **bad)


def test_gradients_reach_every_adapter_weight_and_the_state_holds_no_model_weight():
  """Every adapter leaf gets a gradient (down too, once up has moved off zero); the model's
  weights are not part of the state, and a chain with LoRA keeps the adapter's module."""
  adapter = pj.bottleneck_adapter(['embed$', 'mlp$'], size=4, widths=MLP_WIDTHS)
  frozen, state = adapter.init(jax.random.key(0), user_params())
  x = normal(5, 3, D_IN)
  loss = jax.jit(jax.grad(
      lambda s: jnp.sum(run_user(adapter.apply(frozen, s), x, jax.random.key(3)) ** 2)))
  at_init = loss(state)
  for path, g in at_init.items():  # zero up: only up and its bias can move first
    assert float(jnp.abs(g['up']).max()) > 0 and float(jnp.abs(g['up_bias']).max()) > 0
    assert float(jnp.abs(g['down']).max()) == 0, path
  for path, g in loss(moved(state)).items():
    assert all(float(jnp.abs(v).max()) > 0 for v in g.values()), path
  assert not set(pj.flatten(state)) & set(pj.flatten(user_params()))
  lora = pj.lora('embed/kernel', rank=2)
  adapter = pj.bottleneck_adapter('embed$', size=2)
  for chained in (pj.chain(lora, adapter), pj.chain(adapter, lora)):
    frozen2, states = chained.init(jax.random.key(0), user_params())
    states = tuple(moved(s) for s in states)
    applied = chained.apply(frozen2, states)
    assert inserted_modules(applied) == ['embed']
    assert isinstance(pj.flatten(applied)['embed/kernel'], pj.LowRank)
    lora_only = lora.apply(frozen2, states[0] if chained.config['adapters'][0]['method'] == 'lora'
                           else states[1])
    assert float(jnp.abs(run_user(applied, x) - run_user(lora_only, x)).max()) > 1e-2


@pytest.mark.parametrize('name', ['adapter', 'mosa'])
def test_adapter_file_round_trip(name, tmp_path):
  adapter = pj.from_config({'method': name, 'targets': ['embed$', 'mlp$'], 'size': 3,
                            'widths': MLP_WIDTHS})
  frozen, state = adapter.init(jax.random.key(0), user_params())
  state = moved(state)
  pj.save_adapter(tmp_path, adapter, frozen, state, base_model='user')
  loaded, frozen2, state2, _, meta = pj.load_adapter(tmp_path, user_params())
  assert loaded.config == json.loads(json.dumps(adapter.config)) == meta['method']
  jax.tree.map(np.testing.assert_array_equal, state2, state)
  x = normal(4, 3, D_IN)
  np.testing.assert_array_equal(run_user(loaded.apply(frozen2, state2), x),
                                run_user(adapter.apply(frozen, state), x))


def mosa_layer(active=1, modules=4, seed=5):
  adapter = pj.mosa('layer$', size=4, modules=modules, active=active, seed=seed,
                    activation='tanh', scale=1.5)
  frozen, state = adapter.init(jax.random.key(0), user_params(OneLayer))
  return adapter, frozen, moved(state)


def test_mosa_merged_adapter_is_the_sum_of_its_sparse_modules():
  adapter, frozen, state = mosa_layer()
  parts = sparse_modules(adapter, state)
  ups = np.stack([np.asarray(s['layer']['up']) for _, s in parts])
  assert ((ups != 0).sum(0) <= 1).all()  # non-overlapping ...
  np.testing.assert_allclose(ups.sum(0), state['layer']['up'], rtol=1e-6)  # ... covering up
  sizes = (ups != 0).reshape(4, -1).sum(1)
  assert sizes.min() == sizes.max() == state['layer']['up'].size // 4
  standard, merged = pj.merge_mosa(adapter, state)
  assert standard.config['method'] == 'adapter' and standard.config['size'] == 4
  # The official merge: the sum of the modules over their count (the mean of the experts).
  np.testing.assert_allclose(merged['layer']['up'], ups.sum(0) / 4, rtol=1e-6)
  np.testing.assert_allclose(merged['layer']['up_bias'],
                             np.mean([s['layer']['up_bias'] for _, s in parts], 0), rtol=1e-6)
  # On fresh inputs the merged adapter computes the mean of the modules' adapters, and
  # MoSA's evaluation calls (no 'dropout' rng) compute the merged adapter.
  x = normal(6, 5, D_IN)
  run = lambda a, s: run_user(a.apply(frozen, s), x, module=OneLayer)
  outputs = [run(a, s) for a, s in parts]
  np.testing.assert_allclose(run(standard, merged), np.mean(outputs, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(run(adapter, state), run(standard, merged), rtol=1e-6, atol=1e-6)


def test_mosa_training_calls_activate_a_seeded_draw_of_the_configured_share():
  adapter, frozen, state = mosa_layer(active=2, modules=4)
  x = normal(7, 5, D_IN)
  run = lambda a, s, rng=None: run_user(a.apply(frozen, s), x, rng, module=OneLayer)
  # The draw: `active` distinct modules; their entries are the share active / modules.
  owner = split(5, 'layer', state['layer']['up'].shape, 4)
  for i in range(8):
    chosen = np.asarray(draw(jax.random.key(i), 4, 2))
    assert len(set(chosen.tolist())) == 2
    assert np.isin(owner, chosen).mean() == pytest.approx(0.5)
  # A training call computes the adapter of exactly one pair of modules: up on their entries
  # and the mean of their biases; the same rng gives the same pair, others cover all pairs.
  parts = sparse_modules(adapter, state)
  pairs = {}
  for i in range(4):
    for j in range(i + 1, 4):
      (standard, a), (_, b) = parts[i], parts[j]
      pair = jax.tree.map(lambda u, v: u + v, a, b)
      pair['layer'].update(down=a['layer']['down'], down_bias=a['layer']['down_bias'],
                           up_bias=(a['layer']['up_bias'] + b['layer']['up_bias']) / 2)
      pairs[i, j] = run(standard, pair)
  seen = set()
  for seed in range(24):
    out = run(adapter, state, jax.random.key(seed))
    match = [p for p, want in pairs.items() if np.allclose(out, want, rtol=1e-5, atol=1e-6)]
    assert len(match) == 1, seed
    np.testing.assert_array_equal(out, run(adapter, state, jax.random.key(seed)))
    seen.add(match[0])
  assert len(seen) >= 5
  # Sparse training: the gradient of a training call reaches the active share of up only.
  grad = jax.grad(lambda s: jnp.sum(run(adapter, s, jax.random.key(0)) ** 2))(state)['layer']
  assert float(jnp.mean(grad['up'] != 0)) == pytest.approx(0.5)
  assert int(jnp.sum(jnp.any(grad['up_bias'] != 0, axis=1))) == 2


@pytest.mark.long
def test_mosa_trains_through_the_trainer_on_a_user_model(tmp_path):
  from test_tasks_custom_model import Majority  # a task on a model of stock layers
  c = minilm_vader.get_config('mosa')
  c.method = ml_collections.ConfigDict({'name': 'mosa', 'targets': ['up$'], 'size': 4})
  c.optimizer.lr = 1e-2
  c.train.update({'batch_size': 16, 'eval_batch_size': 32, 'epochs': 2, 'log_every': 1,
                  'checkpoint_every': 0})
  summary = train(c, tmp_path, task=Majority())
  assert summary['steps'] == 8
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').open()]
  train_losses = [r['loss'] for r in records if r['kind'] == 'train']
  assert np.isfinite(train_losses).all() and len(train_losses) == 8
  adapter, frozen, state, _, _ = pj.load_adapter(tmp_path / 'adapter', Majority().model.params)
  assert float(jnp.abs(state['up']['up']).max()) > 0  # it trained
  with pytest.raises(pj.NotMergeableError, match="'mosa' inserts modules"):
    pj.merge(adapter, frozen, state)
