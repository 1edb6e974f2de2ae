"""The method contract: partition/combine, chain, summary, merge, dropout and dense."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax as pj
from peftjax.core import paths as P
from peftjax.core.dropout import dropout, keep_mask
from peftjax.core.leaves import LowRank, dense, is_structured, materialize


def tree(seed, d_in=6, d_out=5):
  k = jax.random.split(jax.random.key(seed), 5)
  return {'enc': {'layer_0': {'query': {'kernel': jax.random.normal(k[0], (d_in, d_out)),
                                        'bias': jax.random.normal(k[1], (d_out,))},
                              'value': {'kernel': jax.random.normal(k[2], (d_in, d_out))}},
                  'layer_1': {'query': {'kernel': jax.random.normal(k[3], (d_in, d_out))}},
                  'norm': {'scale': jax.random.normal(k[4], (d_in,))}}}


def randomize(state, seed):
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


def lowrank(seed, d_in=6, d_out=5, r=2, scale=1.5, rate=0.0):
  k = jax.random.split(jax.random.key(seed), 3)
  return LowRank(jax.random.normal(k[0], (d_in, d_out)), jax.random.normal(k[1], (d_in, r)),
                 jax.random.normal(k[2], (r, d_out)), scale, rate)


@pytest.mark.parametrize('seed,patterns', [(0, ['kernel']), (1, 'layer_0'), (2, ['bias', 'norm'])])
def test_partition_combine_round_trip_is_exact(seed, patterns):
  t = tree(seed)
  selected, rest = pj.partition(t, patterns)
  assert sorted(selected) == sorted(P.select(P.flatten(t), patterns))
  assert not set(selected) & set(P.flatten(rest))
  assert sorted([*selected, *P.flatten(rest)]) == sorted(P.flatten(t))
  back = pj.combine(selected, rest)
  assert jax.tree.structure(back) == jax.tree.structure(t)
  jax.tree.map(np.testing.assert_array_equal, back, t)


def test_num_params_counts_every_element():
  t = tree(3)
  assert pj.num_params(t) == 3 * 6 * 5 + 5 + 6
  assert pj.num_params({}) == 0 and pj.num_params(()) == 0
  assert pj.num_params({'k': lowrank(0, 6, 5, r=3)}) == 6 * 5 + 3 * (6 + 5)


@pytest.mark.parametrize('seed', [0, 1])
def test_chain_of_two_loras_equals_applying_them_in_sequence(seed):
  t = tree(seed)
  first = pj.lora('query/kernel', rank=2, alpha=3)
  second = pj.lora('layer_0/(query|value)/kernel', rank=3, alpha=5)
  chained = pj.chain(first, second)
  frozen, states = chained.init(jax.random.key(seed), t)
  assert isinstance(states, tuple) and len(states) == 2
  s1, s2 = randomize(states[0], seed + 10), randomize(states[1], seed + 20)
  by_hand = second.apply(first.apply(frozen, s1), s2)
  merged = pj.merge(chained, frozen, (s1, s2))
  jax.tree.map(np.testing.assert_array_equal, materialize(chained.apply(frozen, (s1, s2))),
               materialize(by_hand))
  expected = P.flatten(t)
  for state, scale in ((s1, 3 / 2), (s2, 5 / 3)):
    for path, ab in state.items():
      expected[path] = expected[path] + ab['a'] @ ab['b'] * scale
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               merged, P.unflatten(expected))
  restored = pj.unmerge(chained, merged, (s1, s2))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), restored, frozen)
  assert chained.config == {'method': 'chain', 'adapters': [first.config, second.config]}


def rebasing(name='rebase'):
  """A method whose init replaces the frozen weights (as PiSSA's residual does)."""
  return pj.Adapter(init=lambda rng, p, *, calib=None: (jax.tree.map(lambda x: x * 0.5, p), {}),
                    apply=lambda frozen, state: frozen, config={'method': name})


def test_chain_refuses_a_later_method_that_rebases():
  t = tree(4)
  with pytest.raises(ValueError, match="only the first method of a chain may re-base.*'rebase'"):
    pj.chain(pj.lora('query/kernel', rank=2), rebasing()).init(jax.random.key(0), t)
  frozen, (_, s) = pj.chain(rebasing(), pj.lora('query/kernel', rank=2)).init(
      jax.random.key(0), t)
  np.testing.assert_array_equal(frozen['enc']['norm']['scale'], t['enc']['norm']['scale'] * 0.5)
  assert sorted(s) == ['enc/layer_0/query/kernel', 'enc/layer_1/query/kernel']


def test_chain_accepts_a_later_method_that_only_splits_the_tree():
  t = tree(5)
  chained = pj.chain(pj.lora('kernel', rank=2), pj.full(['bias']))
  frozen, (s_lora, s_full) = chained.init(jax.random.key(5), t)
  assert list(s_full) == ['enc/layer_0/query/bias']
  s_lora = randomize(s_lora, 5)
  s_full = {k: v + 1.0 for k, v in s_full.items()}
  merged = pj.merge(chained, frozen, (s_lora, s_full))
  np.testing.assert_array_equal(merged['enc']['layer_0']['query']['bias'],
                                t['enc']['layer_0']['query']['bias'] + 1.0)
  ab = s_lora['enc/layer_1/query/kernel']
  np.testing.assert_allclose(merged['enc']['layer_1']['query']['kernel'],
                             t['enc']['layer_1']['query']['kernel'] + ab['a'] @ ab['b'] * 8,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('adapter', [
    pj.lora('kernel', rank=2), pj.chain(pj.lora('query', rank=1), pj.lora('kernel', rank=2)),
    pj.full(['query']), pj.probe()], ids=['lora', 'chain', 'full', 'probe'])
def test_merge_returns_only_plain_arrays(adapter):
  t = tree(6)
  frozen, state = adapter.init(jax.random.key(6), t)
  state = randomize(state, 6)
  applied = jax.tree.leaves(adapter.apply(frozen, state), is_leaf=is_structured)
  assert any(map(is_structured, applied)) == (adapter.config['method'] in ('lora', 'chain'))
  merged = pj.merge(adapter, frozen, state)
  leaves = jax.tree.leaves(merged, is_leaf=is_structured)
  assert all(isinstance(l, jax.Array) for l in leaves)
  assert sorted(P.flatten(merged)) == sorted(P.flatten(t))
  for path, leaf in P.flatten(merged).items():
    assert leaf.shape == P.flatten(t)[path].shape


def test_summary_rows_and_totals():
  t = tree(7)
  adapter = pj.lora('kernel', rank=2, alpha=6, rank_pattern={'value': 1})
  frozen, state = adapter.init(jax.random.key(7), t)
  head = {'kernel': jnp.zeros((5, 3)), 'bias': jnp.zeros(3)}
  text = pj.summary(adapter, frozen, state, head)
  lines = text.splitlines()
  assert lines[0] == 'method: lora'
  rows = {l.split()[0]: l.split()[1:] for l in lines[3:-1]}
  assert rows == {'enc/layer_0/query/kernel': ['6x5', '22', '2', '3'],
                  'enc/layer_0/value/kernel': ['6x5', '11', '1', '6'],
                  'enc/layer_1/query/kernel': ['6x5', '22', '2', '3']}
  trainable = 22 + 11 + 22 + 18
  total = pj.num_params(t) + trainable
  assert lines[-1] == (f'trainable params: {trainable:,} || all params: {total:,} || '
                       f'trainable%: {100 * trainable / total:.4f}')
  short = pj.summary(adapter, frozen, state, max_rows=1).splitlines()
  assert short[-2] == '... and 2 more' and len(short) == 3 + 1 + 1 + 1


def test_summary_of_selective_full_counts_the_selected_params_once():
  t = tree(8)
  adapter = pj.full(['bias', 'norm'])
  frozen, state = adapter.init(None, t)
  last = pj.summary(adapter, frozen, state).splitlines()[-1]
  assert last == (f'trainable params: 11 || all params: {pj.num_params(t):,} || '
                  f'trainable%: {100 * 11 / pj.num_params(t):.4f}')


def test_full_trains_the_selected_leaves_and_probe_trains_none():
  t = tree(2)
  frozen, state = pj.full(['norm']).init(None, t)
  assert list(state) == ['enc/norm/scale'] and pj.num_params(state) == 6
  jax.tree.map(np.testing.assert_array_equal, pj.full(['norm']).apply(frozen, state), t)
  frozen, state = pj.probe().init(None, t)
  assert state == {} and pj.probe().apply(frozen, state) is t


def test_keep_mask_rate_matches():
  n = (1000, 1000)
  for seed, rate in ((0, 0.1), (1, 0.5), (2, 0.9)):
    m = keep_mask(jax.random.key(seed), n, rate)
    assert m.dtype == jnp.bool_ and m.shape == n
    assert float(m.mean()) == pytest.approx(1 - rate, abs=0.005)
    assert float(m[:, :500].mean()) == pytest.approx(float(m[:, 500:].mean()), abs=0.01)


@pytest.mark.parametrize('rate', [0.1, 0.5])
def test_keep_masks_of_different_keys_are_nearly_independent(rate):
  keys = jax.random.split(jax.random.key(int(rate * 10)), 3)
  m1, m2, m1_again = (keep_mask(keys[0], (1_000_000,), rate),
                      keep_mask(keys[1], (1_000_000,), rate),
                      keep_mask(keys[0], (1_000_000,), rate))
  np.testing.assert_array_equal(m1, m1_again)
  p = 1 - rate
  assert float((m1 == m2).mean()) == pytest.approx(p ** 2 + (1 - p) ** 2, abs=0.005)
  assert float((m1 & m2).mean()) == pytest.approx(p ** 2, abs=0.005)
  assert float((m1[1:] == m1[:-1]).mean()) == pytest.approx(p ** 2 + (1 - p) ** 2, abs=0.005)


def test_dropout_is_inverted_and_off_without_rng_or_rate():
  x = jax.random.normal(jax.random.key(0), (200, 50))
  assert dropout(None, x, 0.5) is x
  assert dropout(jax.random.key(1), x, 0.0) is x
  y = dropout(jax.random.key(1), x, 0.25)
  kept = y != 0
  np.testing.assert_allclose(y[kept], x[kept] / 0.75, rtol=1e-6)
  assert float(kept.mean()) == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_dense_with_a_lowrank_kernel_equals_the_materialized_weight(seed):
  x = jax.random.normal(jax.random.key(100 + seed), (2, 3, 6))
  kernel = lowrank(seed)
  y = dense(x, kernel)
  assert y.shape == (2, 3, 5)
  np.testing.assert_allclose(y, x @ materialize(kernel), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dense(x, materialize(kernel)), y, rtol=1e-5, atol=1e-5)
  ka, kb = jax.random.split(jax.random.key(200 + seed))
  nested = LowRank(kernel, jax.random.normal(ka, (6, 1)), jax.random.normal(kb, (1, 5)), 0.7)
  np.testing.assert_allclose(dense(x, nested), x @ materialize(nested), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dense(x, kernel, rng=jax.random.key(seed)), y)  # rate 0: no-op


def test_dense_with_adapter_dropout_keeps_the_expectation():
  kernel = lowrank(3, r=2, scale=1.0, rate=0.3)
  x = jnp.broadcast_to(jax.random.normal(jax.random.key(4), (1, 6)), (100_000, 6))
  out = dense(x, kernel, rng=jax.random.key(5))
  exact = x[:1] @ materialize(kernel)
  delta = x[:1] @ kernel.delta()
  assert float(jnp.abs(out - exact).max()) > 1e-3  # dropout is on
  np.testing.assert_allclose(out.mean(0), exact[0], atol=0.06 * float(jnp.abs(delta).max()))
  assert len(np.unique(np.asarray(out[:1000]), axis=0)) > 30  # each row draws its own mask
  again = dense(x, kernel, rng=jax.random.key(5))
  np.testing.assert_array_equal(out, again)
  assert not np.allclose(dense(x, kernel, rng=jax.random.key(6)), out)


def test_stacked_adapters_on_one_weight_draw_independent_dropout_masks():
  # Both adapters read input feature 0; the inner one writes output 0, the outer one output 1.
  e0, e1 = jnp.eye(2)[:, :1], jnp.eye(2)[:, 1:]
  inner = LowRank(jnp.zeros((2, 2)), e0, e0.T, 1.0, 0.5)
  outer = LowRank(inner, e0, e1.T, 1.0, 0.5)
  out = dense(jnp.ones((20000, 2)), outer, rng=jax.random.key(7))
  assert set(np.unique(out).tolist()) == {0.0, 2.0}
  np.testing.assert_allclose(out.mean(0), [1.0, 1.0], atol=0.03)
  kept_inner, kept_outer = out[:, 0] != 0, out[:, 1] != 0
  assert float((kept_inner == kept_outer).mean()) == pytest.approx(0.5, abs=0.02)


def test_chain_unmerge_refuses_a_later_method_that_replaced_values():
  t = tree(9)
  adapter = pj.chain(pj.lora('query/kernel', rank=2), pj.full(['bias']))
  frozen, state = adapter.init(jax.random.key(0), t)
  with pytest.raises(NotImplementedError, match=r"method 1 \('full'\).*bias"):
    pj.unmerge(adapter, pj.merge(adapter, frozen, state), state)
  first = pj.chain(pj.full(['bias']), pj.lora('query/kernel', rank=2))
  frozen, state = first.init(jax.random.key(0), t)
  state = (state[0], randomize(state[1], 1))
  unmerged = pj.unmerge(first, pj.merge(first, frozen, state), state)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), unmerged, frozen)
