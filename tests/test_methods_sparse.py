"""Sparse fine-tuning (`peftjax.methods.sparse`): selection, training only the selected
entries inside a stock-layer model, compact files, LT-SFT's selection by change, composition."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax as pj
from peftjax.core import paths as P
from peftjax.core import leaves
from peftjax.core.leaves import SparseDelta
from peftjax.io.params_file import save_params
from peftjax.methods import sparse as S
from peftjax.train import step as T
from test_tasks_custom_model import Majority, _dot_shapes

KERNELS = ('kernel', 'embedding')  # every matrix of the classifier: Embed, DenseGeneral,
# Einsum (one stored (out, in)) and Dense


def test_top_entries_picks_the_global_top_k_and_lines_by_norm():
  rng = np.random.default_rng(0)
  scored = {'a': rng.random((4, 5)), 'b': rng.random((3, 2))}
  got = S.top_entries(scored, 7)
  every = sorted(((v, p, i) for p, s in scored.items() for i, v in enumerate(s.ravel())),
                 reverse=True)[:7]
  want = {p: sorted(i for _, q, i in every if q == p) for p in scored}
  assert {p: list(v) for p, v in got.items()} == want
  score = np.zeros((4, 6))
  score[2] = 1.0
  score[:, 5] = 3.0  # column 5 has the largest norm, then row 2 among rows
  np.testing.assert_array_equal(S.top_lines(score, 1, 0), [2])
  np.testing.assert_array_equal(S.top_lines(score, 1, 1), [5])
  assert S.index_dtype(255) == np.uint8 and S.index_dtype(256) == np.uint16
  with pytest.raises(ValueError, match='cannot select 21 entries out of 20'):
    S.top_entries({'a': scored['a']}, 21)


def _train(adapter, steps=4, lr=0.05):
  """`steps` Adam steps of the trainer's train step on the Majority task."""
  task = Majority()
  frozen, state = adapter.init(jax.random.key(0), task.model.params)
  tx = optax.adam(lr)
  step = jax.jit(T.make_train_step(task, adapter, tx, seed=0))
  train_state = T.init_state({'adapter': state, 'head': {}}, tx)
  for b in range(steps):
    batch = jax.tree.map(jnp.asarray, next(task.batches('train', 16, seed=b)))
    train_state, _ = step(train_state, frozen, batch)
  return task, frozen, train_state.trainable['adapter'], train_state


@pytest.mark.parametrize('structure', ['entries', 'rows', 'columns'])
def test_only_the_selected_entries_move_and_the_rest_stay_bit_identical(structure):
  adapter = pj.sparse_ft(KERNELS, density=0.1, select='magnitude', structure=structure)
  task, frozen, state, train_state = _train(adapter)
  base = P.flatten(task.model.params)
  merged = P.flatten(pj.merge(adapter, frozen, state))
  assert set(state) == {p for p in base if p.endswith(KERNELS)}
  for path, st in state.items():
    leaf = P.flatten(frozen)[path]
    selected = np.zeros(base[path].shape, bool)
    index = np.asarray(leaf.index)
    if structure == 'entries':
      selected.reshape(-1)[index] = True
    elif structure == 'rows':
      selected[index] = True
    else:
      selected[:, index] = True
    moved = np.asarray(merged[path]) != np.asarray(base[path])
    assert not (moved & ~selected).any(), path  # bit-identical outside the selection
    assert moved[selected].mean() > 0.9, path  # and the selection trained
  # The optimiser holds moments of the selected values only.
  moments = jax.tree.leaves(train_state.opt_state)
  assert sum(m.size for m in moments) <= 2 * pj.num_params(state) + 8


def test_the_sparse_step_forms_no_full_size_weight_gradient():
  """While tokens * k < in * out (`leaves.gathers`), the entries' step contains no product
  of a kernel's shape."""
  task = Majority()
  adapter = pj.sparse_ft('kernel', density=0.02, select='random')
  frozen, state = adapter.init(jax.random.key(0), task.model.params)
  tx = optax.adam(1e-3)
  batch = jax.tree.map(jnp.asarray, next(task.batches('train', 3, seed=0)))  # 24 tokens
  jaxpr = jax.make_jaxpr(T.make_train_step(task, adapter, tx, seed=0))(
      T.init_state({'adapter': state, 'head': {}}, tx), frozen, batch)
  kernels = {tuple(P.flatten(frozen)[p].shape) for p in state}
  assert all(leaves.gathers(24, P.flatten(frozen)[p]) for p in state)
  shapes = set(_dot_shapes(jaxpr.jaxpr))
  assert shapes and not kernels & shapes, sorted(shapes)
  # Above it, the delta is formed (one full-size weight) and the check sees it.
  dense = pj.sparse_ft('kernel', density=0.5, select='random')
  frozen_d, state_d = dense.init(jax.random.key(0), task.model.params)
  jaxpr_d = jax.make_jaxpr(T.make_train_step(task, dense, tx, seed=0))(
      T.init_state({'adapter': state_d, 'head': {}}, tx), frozen_d, batch)
  assert kernels & set(_dot_shapes(jaxpr_d.jaxpr))
  # So are a few entries for many tokens: 16 rows of 8 tokens.
  batch16 = jax.tree.map(jnp.asarray, next(task.batches('train', 16, seed=0)))
  assert not all(leaves.gathers(128, P.flatten(frozen)[p]) for p in state)
  jaxpr_16 = jax.make_jaxpr(T.make_train_step(task, adapter, tx, seed=0))(
      T.init_state({'adapter': state, 'head': {}}, tx), frozen, batch16)
  assert kernels & set(_dot_shapes(jaxpr_16.jaxpr))


def test_a_half_percent_selection_saves_under_one_percent_of_the_model(tmp_path):
  task = Majority()
  params = task.model.params
  adapter = pj.sparse_ft(KERNELS, density=0.005, select='magnitude')
  frozen, state = adapter.init(jax.random.key(0), params)
  state = jax.tree.map(lambda v: v + 0.5, state)
  file = pj.save_adapter(tmp_path, adapter, frozen, state, base_model='classifier')
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  entries = pj.num_params(state)
  assert entries == round(0.005 * sum(np.prod(v.shape) for p, v in P.flatten(params).items()
                                      if p.endswith(KERNELS)))
  # values (4 bytes) and index gaps (1 byte here) per entry, and the file's small header
  assert file.stat().st_size <= 0.01 * model_bytes + 2048, (file.stat().st_size, model_bytes)
  _, frozen2, state2, _, _ = pj.load_adapter(tmp_path, params)
  for path in state:
    np.testing.assert_array_equal(P.flatten(frozen2)[path].index, P.flatten(frozen)[path].index)
    np.testing.assert_array_equal(state2[path]['values'], state[path]['values'])
  bigger = jax.tree.map(lambda x: jnp.zeros((x.shape[0] + 1, *x.shape[1:]), x.dtype), params)
  with pytest.raises(pj.AdapterFileError, match='trained for shape'):
    pj.load_adapter(tmp_path, bigger)


def test_change_selects_the_entries_that_moved_most_over_all_matrices(tmp_path):
  """LT-SFT's phase-2 selection: one global threshold on |W_ref - W|."""
  params = Majority().model.params
  flat = P.flatten(params)
  rng = np.random.default_rng(1)
  ref, moved = dict(flat), {}
  for path in ('up/kernel', 'out/kernel'):  # 5 entries each, changed by 1..2
    w = np.asarray(flat[path]).copy()
    index = np.sort(rng.choice(w.size, 5, replace=False))
    w.reshape(-1)[index] += rng.uniform(1.0, 2.0, 5) * rng.choice([-1, 1], 5)
    ref[path], moved[path] = w, index
  ref['query/kernel'] = np.asarray(flat['query/kernel']) + 1e-3  # everything moved a little
  file = tmp_path / 'phase1.safetensors'
  save_params(file, P.unflatten(ref))
  total = sum(np.prod(v.shape) for p, v in flat.items() if p.endswith('kernel'))
  adapter = pj.sparse_ft('kernel', density=10 / total, select='change', reference=str(file))
  frozen, state = adapter.init(jax.random.key(0), params)
  got = {p: np.asarray(P.flatten(frozen)[p].index) for p in state}
  assert set(got) == set(moved)  # the matrices where nothing was selected stay as they are
  for path in state:
    np.testing.assert_array_equal(got[path], moved[path])
  assert not isinstance(P.flatten(frozen)['query/kernel'], SparseDelta)
  pj.save_adapter(tmp_path / 'adapter', adapter, frozen, state, base_model='classifier')
  _, frozen2, state2, _, _ = pj.load_adapter(tmp_path / 'adapter', params)
  assert set(state2) == set(moved)
  assert not isinstance(P.flatten(frozen2)['query/kernel'], SparseDelta)
  with pytest.raises(ValueError, match='go together'):
    pj.sparse_ft('kernel', select='change')


def test_sparse_differences_compose_by_addition():
  """A task's and a domain's differences (overlapping selections) add onto the base, equal
  to applying one fine-tuning after the other and to the sum written out in numpy."""
  params = Majority().model.params
  task = pj.sparse_ft(KERNELS, density=0.3, select='random', seed=1)
  domain = pj.sparse_ft(KERNELS, density=0.3, select='random', seed=2)
  f1, s1 = task.init(jax.random.key(0), params)
  s1 = jax.tree.map(lambda v: v + 1.0, s1)
  after_task = pj.merge(task, f1, s1)
  f2, s2 = domain.init(jax.random.key(0), after_task)
  s2 = jax.tree.map(lambda v: v + 10.0, s2)
  sequential = pj.merge(domain, f2, s2)
  composed = S.compose(params, S.difference(f1, s1), S.difference(f2, s2))
  want = {p: np.array(v) for p, v in P.flatten(params).items()}
  overlap = 0
  for f, s in ((f1, s1), (f2, s2)):
    for path, st in s.items():
      np.add.at(want[path].reshape(-1), np.asarray(P.flatten(f)[path].index),
                np.asarray(st['values']))
  for path in want:
    np.testing.assert_allclose(P.flatten(composed)[path], want[path], rtol=1e-6)
    np.testing.assert_allclose(P.flatten(sequential)[path], want[path], rtol=1e-6)
  for path in s1:
    both = np.intersect1d(P.flatten(f1)[path].index, P.flatten(f2)[path].index)
    overlap += both.size
  assert overlap > 0  # the sum is tested where both selections hold an entry


def test_l1_pulls_the_values_towards_the_base():
  """LT-SFT's L1 term: l1 * sum |values| / the targeted entries."""
  params = Majority().model.params
  adapter = pj.sparse_ft('kernel', density=0.1, l1=0.3)
  frozen, state = adapter.init(jax.random.key(0), params)
  state = jax.tree.map(lambda v: jnp.full_like(v, -2.0), state)
  total = sum(np.prod(v.shape) for p, v in P.flatten(params).items() if p.endswith('kernel'))
  assert float(pj.regularizer(adapter, state)) == pytest.approx(
      0.3 * 2.0 * pj.num_params(state) / total, rel=1e-6)
  assert pj.sparse_ft('kernel').loss is None  # no term without l1


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match='unknown structure'):
    pj.sparse_ft('kernel', structure='blocks')
  with pytest.raises(ValueError, match='unknown select'):
    pj.sparse_ft('kernel', select='largest')
  with pytest.raises(ValueError, match=r'density must be in \(0, 1\]'):
    pj.sparse_ft('kernel', density=0.0)
  with pytest.raises(pj.PatternError):
    pj.sparse_ft('nothing_matches').init(jax.random.key(0), Majority().model.params)
  leaf = SparseDelta(jnp.zeros((3, 4)), jnp.arange(2), jnp.zeros(2))
  assert repr(leaf).startswith('SparseDelta(w=') and repr(leaf).endswith('(3, 4), 2 entries)')


@pytest.mark.parametrize('structure,density', [('entries', 0.02), ('entries', 0.5),
                                               ('rows', 0.3), ('columns', 0.3)])
def test_stock_layers_run_the_sparse_leaves_as_the_merged_model(structure, density):
  """Embed (row lookup), DenseGeneral, Einsum with its kernel stored (out, in) (transposed
  selection) and Dense give the merged model's logits."""
  task = Majority()
  adapter = pj.sparse_ft(KERNELS, density=density, select='random', structure=structure)
  frozen, state = adapter.init(jax.random.key(0), task.model.params)
  keys = iter(jax.random.split(jax.random.key(3), 100))
  state = jax.tree.map(lambda v: jax.random.normal(next(keys), v.shape), state)
  batch = next(task.batches('val', 32))
  structured = task.logits(adapter.apply(frozen, state), batch)
  merged = task.model.module.apply({'params': pj.merge(adapter, frozen, state)}, batch['ids'])
  np.testing.assert_allclose(structured, merged, atol=1e-5)
  assert np.abs(merged - task.logits(task.model.params, batch)).max() > 1e-2


@pytest.mark.long
def test_lt_sft_config_selects_what_phase_one_changed_most(tmp_path):
  """The two-stage config: phase 2 starts from the base and trains exactly the top entries
  of |phase 1 - base|; everything else stays the base's."""
  from configs import minilm_vader_lt_sft
  from peftjax import models
  from peftjax.io.params_file import load_params
  from peftjax.train.stages import run_stages
  config = minilm_vader_lt_sft.get_config('tiny')
  results = run_stages(config, tmp_path)
  assert set(results) == {'full', 'sparse'}
  stage = config.stages.sparse
  base = models.build(stage.model, stage.seed).params
  phase1 = P.flatten(load_params(tmp_path / 'full' / 'model.safetensors', base))
  adapter, frozen, state, _, _ = pj.load_adapter(tmp_path / 'sparse' / 'adapter', base)
  flat = P.flatten(base)
  change = {p: np.abs(np.asarray(phase1[p]) - np.asarray(flat[p])) for p in state}
  k = pj.num_params(state)
  threshold = np.sort(np.concatenate([c.ravel() for c in change.values()]))[-k]
  merged = P.flatten(pj.merge(adapter, frozen, state))
  for path in state:
    index = np.asarray(P.flatten(frozen)[path].index)
    np.testing.assert_array_equal(index, np.flatnonzero(change[path].ravel() >= threshold))
    outside = np.ones(flat[path].size, bool)
    outside[index] = False
    np.testing.assert_array_equal(np.asarray(merged[path]).ravel()[outside],
                                  np.asarray(flat[path]).ravel()[outside])
  assert k == round(0.05 * sum(c.size for c in change.values()))


def test_the_summary_counts_the_model_once_and_the_selected_values():
  params = Majority().model.params
  adapter = pj.sparse_ft(KERNELS, density=0.1)
  frozen, state = adapter.init(jax.random.key(0), params)
  total = pj.num_params(params) + pj.num_params(state)
  assert f'all params: {total:,} ' in pj.summary(adapter, frozen, state)
