"""SSF, (IA)³, BitFit and LayerNorm tuning as their papers define them, on the bundled BERT
(TINY_BERT) and on a model of stock `flax.linen` layers: what each scale and shift acts on,
exact identity at init, merged == structured outputs, what trains, counts and errors."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax as pj
from peftjax.core.leaves import Scaled, is_structured
from peftjax.models import TINY_BERT, Model
from peftjax.models.bert import Bert, BertConfig
from peftjax.parallel import sharding as PS
from peftjax.parallel.mesh import make_mesh

H, I, L = TINY_BERT['hidden_size'], TINY_BERT['intermediate_size'], TINY_BERT['num_layers']
SSF_BERT = ('encoder/.*/kernel', 'norm/scale$')  # every encoder linear and LayerNorm
IA3_BERT = dict(targets=r'attention/(key|value)/kernel$', feedforward=r'layer_\d+/output/kernel$')
VOCAB = 11


# TINY_BERT's sizes with a 1,000-token vocabulary (the tokenizer's is not needed here).
BERT = Bert(BertConfig(vocab_size=1000, **{k: v for k, v in TINY_BERT.items() if k != 'name'}))


@pytest.fixture(scope='module')
def bert():
  ids = jnp.zeros((1, 5), jnp.int32)
  return Model(BERT, jax.jit(BERT.init)(jax.random.key(0), ids, ids + 1)['params'], 'tiny',
               BERT.logical_axes)


@jax.jit
def run_bert(params, batch):
  """The bundled BERT on `params` (structured leaves or plain arrays)."""
  return pj.apply(BERT, params, *batch)


@jax.jit
def run_user(params, ids):
  return pj.apply(UserModel(), params, ids)


def bert_batch(seed):
  """Fresh random token ids (3 x 5: 15 rows, no kernel dimension) and a mask with padding."""
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, 1000, (3, 5)), jnp.int32)
  return ids, jnp.asarray(np.arange(5)[None, :] < np.array([[5], [3], [4]]), jnp.int32)


class UserModel(nn.Module):
  """Stock layers only: Embed, Dense, LayerNorm, DenseGeneral, an Einsum storing (out, in)."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, 8, name='embed')(ids)
    x = nn.LayerNorm(name='norm')(nn.Dense(8, name='dense')(x))
    h = nn.gelu(nn.DenseGeneral(16, name='up')(x))
    return nn.Einsum((4, 16), 'blf,cf->blc', name='out')(h)


def user_model():
  ids = jnp.zeros((1, 3), jnp.int32)
  params = jax.jit(UserModel().init)(jax.random.key(0), ids)['params']
  rng = np.random.default_rng(1)  # biases and norm params away from 0 / 1
  return jax.tree.map(lambda x: x + jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype),
                      params)


def user_ids(seed):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (2, 6)), jnp.int32)


def moved(state, seed=3, std=0.3):
  """`state` moved in every entry, as after training (scales around 1, shifts around 0)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + jnp.asarray(std * rng.standard_normal(x.shape), x.dtype),
                      state)


def assert_merged_equals_structured(structured, merged, base):
  """The merged tree's outputs equal the structured tree's, which differ from the base's."""
  np.testing.assert_allclose(merged, structured, atol=1e-5)
  assert float(jnp.abs(structured - base).max()) > 1e-2  # the adapter acts


# SSF ------------------------------------------------------------------------------------


def test_ssf_merged_equals_structured_on_bert(bert):
  adapter = pj.ssf(SSF_BERT, init='normal')
  frozen, state = adapter.init(jax.random.key(0), bert.params)
  state = moved(state)
  merged = pj.merge(adapter, frozen, state)
  assert jax.tree.structure(merged) == jax.tree.structure(bert.params)  # a plain BERT tree
  batch = bert_batch(1)
  assert_merged_equals_structured(run_bert(adapter.apply(frozen, state), batch),
                                 run_bert(merged, batch),
                                 run_bert(bert.params, batch))


def test_ssf_merged_equals_structured_on_a_stock_flax_model():
  params = user_model()
  adapter = pj.ssf(['dense/kernel', 'norm/scale', 'up/kernel'])
  frozen, state = adapter.init(jax.random.key(0), params)
  state = moved(state)
  ids = user_ids(2)
  assert_merged_equals_structured(run_user(adapter.apply(frozen, state), ids),
                                 run_user(pj.merge(adapter, frozen, state), ids),
                                 run_user(params, ids))


def test_ssf_chains_with_lora_either_way():
  """`chain(ssf, lora)` (LoRA over `Scaled` kernels) and `chain(lora, ssf)` (`Scaled` over
  `LowRank`): the structured tree computes what the merged one does, and unmerges."""
  params, ids = user_model(), user_ids(7)
  for adapter in (pj.chain(pj.ssf(['dense/kernel', 'up/kernel']), pj.lora('kernel', rank=2)),
                  pj.chain(pj.lora('kernel', rank=2), pj.ssf(['dense/kernel', 'up/kernel']))):
    frozen, state = adapter.init(jax.random.key(0), params)
    state = moved(state)
    merged = pj.merge(adapter, frozen, state)
    assert_merged_equals_structured(run_user(adapter.apply(frozen, state), ids),
                                   run_user(merged, ids), run_user(params, ids))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 pj.unmerge(adapter, merged, state), frozen)


def test_ssf_is_scale_then_shift_of_each_op_output():
  """y' = γ ⊙ y + β after a Dense and after a LayerNorm, from the base op's own output."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((5, 6)), jnp.float32)
  for module, target in ((nn.Dense(3), 'kernel'), (nn.LayerNorm(), 'scale')):
    params = jax.tree.map(lambda p: p + 0.5, module.init(jax.random.key(0), x)['params'])
    adapter = pj.ssf(target)
    frozen, state = adapter.init(jax.random.key(0), params)
    state = moved(state, seed=5)
    gamma, beta = state[target]['scale'], state[target]['shift']
    want = gamma * module.apply({'params': params}, x) + beta
    got = pj.apply(module, adapter.apply(frozen, state), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(module.apply({'params': pj.merge(adapter, frozen, state)}, x),
                               want, rtol=1e-5, atol=1e-6)


def test_ssf_identity_init_is_the_base_model_exactly(bert):
  """Op by op (eagerly: a jitted program may fuse the two trees' sums differently)."""
  adapter = pj.ssf(SSF_BERT)
  frozen, state = adapter.init(jax.random.key(0), bert.params)
  assert all(np.all(s['scale'] == 1) and np.all(s['shift'] == 0) for s in state.values())
  batch = bert_batch(2)
  np.testing.assert_array_equal(bert.apply(adapter.apply(frozen, state), *batch),
                                bert.apply(bert.params, *batch))
  jax.tree.map(np.testing.assert_array_equal, pj.merge(adapter, frozen, state), bert.params)
  params = user_model()
  adapter = pj.ssf(['dense/kernel', 'norm/scale', 'up/kernel'])
  frozen, state = adapter.init(jax.random.key(0), params)
  np.testing.assert_array_equal(pj.apply(UserModel(), adapter.apply(frozen, state), user_ids(3)),
                                pj.apply(UserModel(), params, user_ids(3)))


def test_ssf_normal_init_is_the_official_draw(bert):
  _, state = pj.ssf(SSF_BERT, init='normal').init(jax.random.key(0), bert.params)
  scales = np.concatenate([np.asarray(s['scale']) for s in state.values()])
  shifts = np.concatenate([np.asarray(s['shift']) for s in state.values()])
  assert abs(scales.mean() - 1) < 0.005 and abs(scales.std() - 0.02) < 0.003
  assert abs(shifts.mean()) < 0.005 and abs(shifts.std() - 0.02) < 0.003


def test_the_ssf_step_forms_no_full_size_weight_gradient(bert):
  """The structured leaf's backward pass has no (in, out) product; materialising W·diag(γ) in
  the loss (the dense alternative) has one per kernel, so the check can tell."""
  adapter = pj.ssf(SSF_BERT)
  frozen, state = adapter.init(jax.random.key(0), bert.params)
  kernels = {tuple(v.shape) for p, v in pj.flatten(bert.params).items() if p in state
             and v.ndim == 2}
  batch = bert_batch(0)

  def shapes(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        yield tuple(eqn.outvars[0].aval.shape)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from shapes(sub)

  def dot_shapes(transform):
    loss = lambda s: run_bert(transform(adapter.apply(frozen, s)), batch).sum()
    return set(shapes(jax.make_jaxpr(jax.grad(loss))(state).jaxpr))

  assert not kernels & dot_shapes(lambda params: params)
  assert kernels <= dot_shapes(pj.materialize)


# (IA)³ ----------------------------------------------------------------------------------


def test_ia3_merged_equals_structured_on_bert_and_stock_layers(bert):
  adapter = pj.ia3(**IA3_BERT)
  frozen, state = adapter.init(jax.random.key(0), bert.params)
  assert all(np.all(v == 1) for v in jax.tree.leaves(state))  # the contract: exact at init
  state = moved(state)
  batch = bert_batch(4)
  assert_merged_equals_structured(run_bert(adapter.apply(frozen, state), batch),
                                 run_bert(pj.merge(adapter, frozen, state), batch),
                                 run_bert(bert.params, batch))
  params = user_model()  # columns of a Dense and of the embedding; rows of an (out, in) Einsum
  for targets, feedforward in ((['dense/kernel', 'embed/embedding'], ['out/kernel']),
                               (['up/kernel'], ['embed/embedding'])):
    adapter = pj.ia3(targets, feedforward)
    frozen, state = adapter.init(jax.random.key(0), params)
    state = moved(state)
    ids = user_ids(5)
    assert_merged_equals_structured(
        run_user(adapter.apply(frozen, state), ids),
        run_user(pj.merge(adapter, frozen, state), ids),
        run_user(params, ids))


def test_ia3_rescales_exactly_keys_values_and_ffn_activations(bert):
  """In block 0 (whose input the adapter leaves unchanged): keys and values are l ⊙ the
  base projections (bias included), queries and the pre-activation FFN are as computed from
  their inputs, and the FFN output is (l_ff ⊙ gelu(h)) W_down + b."""
  adapter = pj.ia3(**IA3_BERT)
  frozen, state = adapter.init(jax.random.key(0), bert.params)
  state = moved(state, seed=6)
  batch = bert_batch(5)

  @jax.jit
  def block0(params):
    _, found = bert.apply(params, *batch, capture_intermediates=True, mutable=['intermediates'])
    layer = found['intermediates']['encoder']['layer_0']
    return {k: layer[k]['__call__'][0] for k in ('attention_norm', 'intermediate', 'output')} | {
        k: layer['attention'][k]['__call__'][0] for k in ('query', 'key', 'value')}

  base, got = block0(bert.params), block0(adapter.apply(frozen, state))
  prefix = 'encoder/layer_0/'
  np.testing.assert_array_equal(got['query'], base['query'])
  for name in ('key', 'value'):
    np.testing.assert_allclose(got[name], base[name] * state[f'{prefix}attention/{name}/kernel'][
        'scale'], rtol=1e-5, atol=1e-6)
  w = pj.flatten(bert.params)
  np.testing.assert_allclose(  # the intermediate kernel itself is not rescaled
      got['intermediate'], got['attention_norm'] @ w[f'{prefix}intermediate/kernel']
      + w[f'{prefix}intermediate/bias'], rtol=1e-4, atol=1e-5)
  activations = jax.nn.gelu(got['intermediate'], approximate=False)
  l_ff = state[f'{prefix}output/kernel']['input_scale']
  np.testing.assert_allclose(got['output'], (activations * l_ff) @ w[f'{prefix}output/kernel']
                             + w[f'{prefix}output/bias'], rtol=1e-4, atol=1e-5)
  unscaled = activations @ w[f'{prefix}output/kernel'] + w[f'{prefix}output/bias']
  assert float(jnp.abs(got['output'] - unscaled).max()) > 0.1 * float(jnp.abs(unscaled).max())


# BitFit and LayerNorm tuning ------------------------------------------------------------


def train_steps(bert, adapter, steps=3):
  """`steps` Adam steps on a random regression of the pooled output; the merged tree."""
  frozen, state = adapter.init(jax.random.key(0), bert.params)
  batch, target = bert_batch(6), jnp.asarray(np.random.default_rng(0).standard_normal(H))
  loss = lambda s: jnp.mean((run_bert(adapter.apply(frozen, s), batch)[:, 0] - target)
                            ** 2)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(state, opt):
    updates, opt = tx.update(jax.grad(loss)(state), opt)
    return optax.apply_updates(state, updates), opt

  opt = tx.init(state)
  for _ in range(steps):
    state, opt = step(state, opt)
  return pj.merge(adapter, frozen, state)


@pytest.mark.parametrize('name,trained', [('bitfit', r'/bias$'),
                                          ('ln_tuning', r'norm/(scale|bias)$')])
def test_only_the_biases_or_norms_train(bert, name, trained):
  import re
  merged, base = pj.flatten(train_steps(bert, pj.REGISTRY[name]())), pj.flatten(bert.params)
  assert merged.keys() == base.keys()
  for path, value in base.items():
    if re.search(trained, path):
      assert np.any(merged[path] != value), path
    else:
      np.testing.assert_array_equal(merged[path], value, err_msg=path)


def test_trainable_counts_match_the_formulas(bert):
  count = lambda adapter: pj.num_params(adapter.init(jax.random.key(0), bert.params)[1])
  # per block: 6 kernels (q, k, v, o: H outputs; intermediate: I; output: H) and 2 norms
  assert count(pj.ssf(SSF_BERT)) == L * 2 * (5 * H + I + 2 * H) + 2 * H  # + embeddings norm
  assert count(pj.ia3(**IA3_BERT)) == L * (2 * H + I)
  assert count(pj.bitfit()) == L * (5 * H + I + 2 * H) + H
  assert count(pj.ln_tuning()) == L * 4 * H + 2 * H


# Errors, config, sharding -----------------------------------------------------------------


class NoBias(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.Dense(4, use_bias=False, name='plain')(x)
    return nn.DenseGeneral((2, 2), name='multi')(nn.Conv(3, (2,), name='conv')(y))


def test_clear_errors(bert):
  params = NoBias().init(jax.random.key(0), jnp.zeros((1, 5, 3)))['params']
  with pytest.raises(pj.PatternError, match=r"'attention/kex' matches no kernel or norm scale"):
    pj.ssf('attention/kex').init(jax.random.key(0), bert.params)
  with pytest.raises(pj.PatternError, match="matches no kernel path"):
    pj.ia3('query/kernel', 'outptu/kernel').init(jax.random.key(0), bert.params)
  with pytest.raises(ValueError, match=r'needs a bias plain/bias of shape \(4,\).*found none'):
    pj.ssf('plain').init(jax.random.key(0), params)
  for method in (pj.ssf, pj.ia3):
    for target, shape in (('conv', r'\(2, 4, 3\)'), ('multi', r'\(3, 2, 2\)')):
      with pytest.raises(ValueError, match=f'{target}/kernel has shape {shape}.*2-D kernels'):
        method(f'{target}/kernel').init(jax.random.key(0), params)
  with pytest.raises(ValueError, match='selected by both'):
    pj.ia3('value/kernel', 'attention/.*/kernel').init(jax.random.key(0), bert.params)
  with pytest.raises(ValueError, match=r"bitfit trains bias terms only.*query/kernel"):
    pj.bitfit('query/').init(jax.random.key(0), bert.params)
  with pytest.raises(ValueError, match=r"ln_tuning trains norm scales and biases only"):
    pj.ln_tuning('embeddings/').init(jax.random.key(0), bert.params)
  with pytest.raises(ValueError, match="unknown SSF init 'ones'"):
    pj.ssf('kernel', init='ones')
  with pytest.raises(ValueError, match='needs targets or feedforward'):
    pj.ia3(())


def test_configs_rebuild_the_methods_and_their_paper_settings():
  from configs import minilm_vader
  for name, lr in (('ssf', 5e-3), ('ia3', 3e-3), ('bitfit', 1e-3), ('ln_tuning', 1e-3)):
    c = minilm_vader.get_config(name)
    assert (c.optimizer.lr, c.optimizer.weight_decay) == (lr, 0.0)
    adapter = pj.from_config({'method': name, **{k: v for k, v in c.method.to_dict().items()
                                                 if k != 'name'}})
    assert pj.from_config(adapter.config).config == adapter.config
    assert adapter.config['method'] == name


def test_scaled_leaves_and_states_shard_like_their_weight(bert):
  """A `Scaled` leaf's w like its kernel, its scale like the axis it scales; the states'
  vectors likewise (rows of W_down over 'mlp', columns of W_k over 'heads')."""
  mesh = make_mesh(2, 2, 2)
  base = PS.param_specs(bert.params, bert.logical_axes, mesh)
  adapter = pj.ia3(**IA3_BERT)
  frozen, state = adapter.init(jax.random.key(0), bert.params)
  down, key = 'encoder/layer_0/output/kernel', 'encoder/layer_0/attention/key/kernel'
  applied = pj.flatten(adapter.apply(frozen, state))
  assert isinstance(applied[down], Scaled) and applied[down].axis == 0
  tree = {'state': state, 'frozen': {down: applied[down], key: applied[key]}}
  specs = jax.tree.map(lambda s: s.spec, PS.shardings(tree, base, mesh))
  assert base[down][0] == jax.sharding.PartitionSpec('tensor', 'fsdp')
  assert specs['state'][down]['input_scale'] == jax.sharding.PartitionSpec('tensor')
  assert specs['state'][key]['scale'] == jax.sharding.PartitionSpec('tensor')
  assert specs['frozen'][down].w == base[down][0]
  assert specs['frozen'][down].scale == jax.sharding.PartitionSpec('tensor')
  assert not any(is_structured(x) for x in jax.tree.leaves(
      pj.merge(adapter, frozen, state), is_leaf=is_structured))
