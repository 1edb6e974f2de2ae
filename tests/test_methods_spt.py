"""SPT (`peftjax.methods.sensitivity`): sensitivities against jax.grad by hand, the allocation
against an entry-by-entry walk of the rule, the exact budget, the switch to LoRA in a case
built to force it, real train steps and files that load without calibration data."""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax as pj
from peftjax.core import calib as C
from peftjax.core import paths as P
from peftjax.core.leaves import LowRank, SparseDelta
from peftjax.methods import sensitivity as S
from peftjax.train import step as T
from test_tasks_custom_model import Majority

KERNELS = ('kernel', 'embedding')


@functools.lru_cache(maxsize=None)
def majority():
  """The Majority task, three calibration batches and the Calibration the trainer builds."""
  task = Majority()
  batches = [jax.tree.map(jnp.asarray, next(task.batches('train', 16, seed=b)))
             for b in range(3)]
  return task, batches, task.calibration({}, lambda: batches)


def by_hand(task, batches, paths):
  """sum_c (dL_c/dW)^2 / C with jax.grad on each batch."""
  grad = jax.jit(jax.grad(lambda p, b: task.loss(p, {}, b)))
  grads = [P.flatten(grad(task.model.params, b)) for b in batches]
  return {p: np.mean([np.asarray(g[p], np.float64) ** 2 for g in grads], axis=0)
          for p in paths}


def test_sensitivity_is_the_squared_gradient_of_each_batch_averaged():
  task, batches, cal = majority()
  paths = [p for p in P.flatten(task.model.params) if p.endswith(KERNELS)]
  want = by_hand(task, batches, paths)
  got = S.sensitivities(cal, paths)
  for path in paths:
    np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=1e-12)
  # Below every switch count (threshold 1: (in + out) * 2 >= 64 entries) SPT tunes exactly
  # the global top-`budget` entries of that sensitivity.
  adapter = pj.spt(KERNELS, budget=40, threshold=1.0, rank=2)
  frozen, state = adapter.init(jax.random.key(0), task.model.params, calib=cal)
  flat = np.concatenate([want[p].ravel() for p in paths])
  top = set(np.argsort(-flat)[:40].tolist())
  starts = dict(zip(paths, np.cumsum([0] + [want[p].size for p in paths[:-1]])))
  chosen = {int(starts[p] + i) for p in state for i in np.asarray(P.flatten(frozen)[p].index)}
  assert all(set(st) == {'values'} for st in state.values())
  assert chosen == top


def walk(scored, budget, rank, threshold):
  """The rule entry by entry: by descending score (ties: earlier path, position), an entry
  whose matrix then counts >= threshold * (in + out) * rank sensitive entries switches the
  matrix to LoRA if its factors, less the entries it held, fit in what is left."""
  paths = list(scored)
  order = sorted((-float(s), n, i) for n, p in enumerate(paths)
                 for i, s in enumerate(np.ravel(scored[p])))
  held = {p: [] for p in paths}
  lora, capped, left = set(), set(), budget
  for _, n, i in order:
    p = paths[n]
    if not left:
      break
    if p in lora or p in capped:
      continue
    size = sum(scored[p].shape) * rank
    if len(held[p]) + 1 >= threshold * size:
      if size - len(held[p]) <= left:
        lora.add(p)
        left -= size - len(held[p])
        held[p] = []
      else:
        capped.add(p)
    else:
      held[p].append(i)
      left -= 1
  return lora, {p: sorted(h) for p, h in held.items() if h}, left


def test_the_allocation_is_the_rule_walked_entry_by_entry():
  rng = np.random.default_rng(0)
  checked = {'exact': 0, 'lora': 0, 'mixed': 0, 'unreachable': 0}
  for case in range(200):
    shapes = [tuple(rng.integers(2, 10, 2)) for _ in range(rng.integers(1, 5))]
    scored = {f'm{n}/kernel': rng.integers(0, 6, s).astype(np.float32) * rng.random()
              if case % 3 == 0 else rng.random(s).astype(np.float32)  # ties, or none
              for n, s in enumerate(shapes)}
    rank = int(rng.integers(1, 3))
    threshold = float(rng.choice([0.25, 0.5, 1.0]))
    budget = int(rng.integers(1, sum(s.size for s in scored.values()) // 2 + 2))
    lora, held, left = walk(scored, budget, rank, threshold)
    if left:
      with pytest.raises(ValueError, match='cannot spend a budget'):
        S.allocate(scored, budget, rank, threshold)
      checked['unreachable'] += 1
      continue
    got = S.allocate(scored, budget, rank, threshold)
    assert set(got.lora) == lora, case
    assert {p: e.tolist() for p, e in got.entries.items()} == held, case
    spent = sum(sum(scored[p].shape) * rank for p in lora) + sum(map(len, held.values()))
    assert spent == budget
    checked['exact'] += 1
    checked['lora'] += bool(lora)
    checked['mixed'] += bool(lora) and bool(held)
  assert min(checked.values()) >= 5, checked


class TwoBranches(nn.Module):
  """loud sees inputs 30x larger than quiet: its kernel's gradients are ~30x larger."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name='loud')(30.0 * x[..., :6]) + nn.Dense(4, name='quiet')(x[..., 6:])


def two_branches(seed=0):
  rng = np.random.default_rng(seed)
  batches = [{'x': jnp.asarray(rng.standard_normal((32, 12)), jnp.float32),
              'y': jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)} for _ in range(3)]
  params = TwoBranches().init(jax.random.key(seed), batches[0]['x'])['params']
  forward = lambda p, b: TwoBranches().apply({'params': p}, b['x'])
  loss = lambda p, b: jnp.mean((forward(p, b) - b['y']) ** 2)
  return params, C.Calibration(forward, params, batches, loss_fn=loss)


@pytest.mark.parametrize('seed', [0, 1])
def test_the_matrix_whose_sensitive_count_reaches_the_threshold_switches_to_lora(seed):
  """Rank 1, threshold 0.5 on (6, 4) kernels: LoRA costs 10 and a matrix switches at its 5th
  sensitive entry. loud holds the top entries, so with a budget of 13 it switches (10) and
  quiet takes its 3 most sensitive entries; with 4, loud keeps 4 entries and nothing
  switches; with 5, loud cannot afford the switch."""
  params, cal = two_branches(seed)
  s = S.sensitivities(cal, ['loud/kernel', 'quiet/kernel'])
  assert np.sort(s['loud/kernel'].ravel())[-5] > s['quiet/kernel'].max()  # the construction
  adapter = pj.spt('kernel', budget=13, threshold=0.5, rank=1, dropout=0.0)
  frozen, state = adapter.init(jax.random.key(0), params, calib=cal)
  assert set(state['loud/kernel']) == {'a', 'b'}
  assert state['loud/kernel']['a'].shape == (6, 1) and state['loud/kernel']['b'].shape == (1, 4)
  assert set(state['quiet/kernel']) == {'values'}
  flat = P.flatten(frozen)
  assert not isinstance(flat['loud/kernel'], SparseDelta)
  np.testing.assert_array_equal(flat['quiet/kernel'].index,
                                np.sort(np.argsort(-s['quiet/kernel'].ravel())[:3]))
  assert pj.num_params(state) == 13
  applied = P.flatten(adapter.apply(frozen, state))
  assert isinstance(applied['loud/kernel'], LowRank) and applied['loud/kernel'].scale == 1.0
  bound = 1 / math.sqrt(6)  # torch's Linear(6, r) init of A; B = 0
  assert np.abs(state['loud/kernel']['a']).max() <= bound
  assert not np.any(state['loud/kernel']['b'])

  top = {p: np.sort(np.argsort(-v.ravel())[:k]) for p, v in s.items()
         for k in [4 if p == 'loud/kernel' else 1]}
  frozen4, state4 = pj.spt('kernel', budget=4, threshold=0.5, rank=1).init(
      jax.random.key(0), params, calib=cal)
  assert list(state4) == ['loud/kernel'] and set(state4['loud/kernel']) == {'values'}
  np.testing.assert_array_equal(P.flatten(frozen4)['loud/kernel'].index, top['loud/kernel'])
  # With 5, loud's 5th entry would switch it for 10 - 4 > 1 left: loud stays at 4 entries,
  # one below its switch count, and the fifth goes to quiet.
  frozen5, state5 = pj.spt('kernel', budget=5, threshold=0.5, rank=1).init(
      jax.random.key(0), params, calib=cal)
  assert all(set(st) == {'values'} for st in state5.values())
  for path, index in top.items():
    np.testing.assert_array_equal(P.flatten(frozen5)[path].index, index)


@pytest.mark.parametrize('budget', [50, 200, 300, 0.1])
def test_the_budget_is_spent_exactly(budget):
  task, _, cal = majority()
  adapter = pj.spt(KERNELS, budget=budget, threshold=0.5, rank=2)
  frozen, state = adapter.init(jax.random.key(0), task.model.params, calib=cal)
  flat = P.flatten(task.model.params)
  total = sum(v.size for p, v in flat.items() if p.endswith(KERNELS))
  want = budget if isinstance(budget, int) else round(budget * total)
  assert pj.num_params(state) == want
  info = pj.core.adapter.describe_targets(adapter, frozen, state)
  assert sum(row['trainable'] for row in info.values()) == want
  kinds = {row['tuning'] for row in info.values()}
  assert kinds == ({'entries'} if budget == 50 else {'entries', 'lora'})


def _train(adapter, steps=4, lr=0.05):
  """`steps` Adam steps of the trainer's train step on the Majority task."""
  task, _, cal = majority()
  frozen, state = adapter.init(jax.random.key(0), task.model.params, calib=cal)
  tx = optax.adam(lr)
  step = jax.jit(T.make_train_step(task, adapter, tx, seed=0))
  train_state = T.init_state({'adapter': state, 'head': {}}, tx)
  for b in range(steps):
    batch = jax.tree.map(jnp.asarray, next(task.batches('train', 16, seed=10 + b)))
    train_state, _ = step(train_state, frozen, batch)
  return task, frozen, train_state.trainable['adapter'], train_state


def test_train_steps_move_the_selection_and_leave_every_other_entry_bit_identical():
  adapter = pj.spt(KERNELS, budget=200, threshold=0.5, rank=2)
  task, frozen, state, train_state = _train(adapter)
  base = P.flatten(task.model.params)
  merged = P.flatten(pj.merge(adapter, frozen, state))
  kinds = {p: 'lora' if 'a' in st else 'entries' for p, st in state.items()}
  assert set(kinds.values()) == {'lora', 'entries'} and pj.num_params(state) == 200
  for path, value in base.items():
    moved = np.asarray(merged[path]) != np.asarray(value)
    if kinds.get(path) == 'entries':
      selected = np.zeros(value.shape, bool)
      selected.reshape(-1)[np.asarray(P.flatten(frozen)[path].index)] = True
      assert not (moved & ~selected).any(), path  # bit-identical outside the selection
      assert moved[selected].mean() > 0.9, path
    elif kinds.get(path) == 'lora':
      assert moved.mean() > 0.9, path
    else:
      assert not moved.any(), path  # untargeted: biases, norm, unselected matrices
  moments = jax.tree.leaves(train_state.opt_state)
  assert sum(m.size for m in moments) <= 2 * pj.num_params(state) + 8


def test_a_saved_adapter_loads_without_calibration_data(tmp_path):
  adapter = pj.spt(KERNELS, budget=300, threshold=0.5, rank=2, dropout=0.2)
  task, frozen, state, _ = _train(adapter, steps=2)
  params = task.model.params
  pj.save_adapter(tmp_path, adapter, frozen, state, base_model='classifier')
  loaded, frozen2, state2, _, meta = pj.load_adapter(tmp_path, params)  # no calib anywhere
  assert loaded.config == adapter.config == meta['method']
  assert {p: set(st) for p, st in state2.items()} == {p: set(st) for p, st in state.items()}
  jax.tree.map(np.testing.assert_array_equal, state2, state)
  jax.tree.map(np.testing.assert_array_equal, frozen2, frozen)
  for path, st in state.items():
    leaf = P.flatten(frozen2)[path]
    assert isinstance(leaf, SparseDelta) == ('values' in st)
  batch = next(task.batches('val', 32))
  np.testing.assert_array_equal(task.logits(loaded.apply(frozen2, state2), batch),
                                task.logits(adapter.apply(frozen, state), batch))
  applied = [l for l in jax.tree.leaves(loaded.apply(frozen2, state2),
                                        is_leaf=lambda x: isinstance(x, LowRank))
             if isinstance(l, LowRank)]
  assert applied and all(l.dropout == 0.2 and l.scale == 1.0 for l in applied)


def test_bad_input_is_a_clear_error():
  task, _, cal = majority()
  params = task.model.params
  with pytest.raises(ValueError, match='is initialised from data: pass calib'):
    pj.spt(KERNELS, rank=2).init(jax.random.key(0), params)
  with pytest.raises(ValueError, match='budget must be at least 1'):
    pj.spt(KERNELS, budget=0)
  with pytest.raises(ValueError, match=r'fraction must be in \(0, 1\)'):
    pj.spt(KERNELS, budget=1.0)
  with pytest.raises(ValueError, match='budget must be an int'):
    pj.spt(KERNELS, budget='1%')
  with pytest.raises(ValueError, match=r'threshold must be in \(0, 1\]'):
    pj.spt(KERNELS, threshold=10.0)
  with pytest.raises(ValueError, match='rank 4 exceeds min'):  # out/kernel is (3, 32)
    pj.spt(KERNELS, rank=4).init(jax.random.key(0), params, calib=cal)
  with pytest.raises(ValueError, match='cannot spend a budget of 1700'):  # > all on LoRA
    pj.spt(KERNELS, budget=1700, rank=1).init(jax.random.key(0), params, calib=cal)


def test_the_contract_case_tunes_one_matrix_of_each_kind():
  from test_methods_contract import initialised
  _, frozen, state = initialised('spt')
  assert set(state['down/kernel']) == {'a', 'b'} and set(state['up/kernel']) == {'values'}
  assert isinstance(P.flatten(frozen)['up/kernel'], SparseDelta)
  assert pj.num_params(state) == 40
