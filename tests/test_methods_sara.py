"""SaRA (`peftjax.methods.sparse_low_rank`): one absolute threshold on |W|, the nuclear-norm
term on the trained sparse matrices, and the progressive re-selection, inside the stock-layer
model of `test_tasks_custom_model` with the trainer's step and in the trainer's runs."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import peftjax as pj
from peftjax import tasks
from peftjax.core import paths as P
from peftjax.methods import sparse_low_rank as SR
from peftjax.train import step as T
from peftjax.train.loop import train
from test_methods_sparse import KERNELS, _train
from test_tasks_custom_model import Majority
from tiny_runs import adapter_tensors, tiny, train_losses


def _merged(adapter, frozen, state):
  """`pj.merge`, as one compiled program (eager ops compile once per shape)."""
  return jax.jit(functools.partial(pj.merge, adapter))(frozen, state)


def _selected(frozen, path) -> np.ndarray:
  return np.asarray(P.flatten(frozen)[path].index)


def test_the_entries_below_one_threshold_train_and_the_rest_are_the_base():
  params = Majority().model.params
  flat = {p: np.asarray(v) for p, v in P.flatten(params).items()}
  at = np.argsort(np.abs(flat['up/kernel']).ravel())[150]
  threshold = float(np.abs(flat['up/kernel']).ravel()[at])  # an entry's |W| exactly: left out
  adapter = pj.sara(KERNELS, threshold=threshold)
  frozen, state = adapter.init(jax.random.key(0), params)
  assert set(state) == {p for p in flat if p.endswith(KERNELS)}
  for path, st in state.items():
    w = flat[path].ravel()
    want = [i for i, x in enumerate(w.tolist()) if abs(x) < threshold]
    np.testing.assert_array_equal(_selected(frozen, path), want)
    np.testing.assert_array_equal(st['values'], w[want])  # the weights themselves train
    rest = np.asarray(P.flatten(frozen)[path].w).ravel()
    assert not rest[want].any()
    np.testing.assert_array_equal(np.delete(rest, want), np.delete(w, want))
  assert at not in _selected(frozen, 'up/kernel') and _selected(frozen, 'up/kernel').size == 150
  # One threshold for every matrix, not one fraction: the matrices' fractions differ.
  fractions = [st['values'].size / flat[p].size for p, st in state.items()]
  assert max(fractions) - min(fractions) > 0.1, fractions
  jax.tree.map(np.testing.assert_array_equal, _merged(adapter, frozen, state), params)
  # A fraction of all the targets' entries, as one absolute threshold.
  total = sum(flat[p].size for p in state)
  quarter_at = SR.threshold_at(params, KERNELS, 0.25)
  _, quarter = pj.sara(KERNELS, threshold=quarter_at).init(jax.random.key(0), params)
  assert pj.num_params(quarter) == round(0.25 * total)
  assert pj.num_params(quarter) == sum(int((np.abs(flat[p]) < quarter_at).sum()) for p in state)


def test_unselected_entries_stay_bit_identical_after_train_steps():
  adapter = pj.sara(KERNELS, threshold=0.1, lambda_rank=0.05, rank_min_dim=0)
  task, frozen, state, train_state = _train(adapter)
  base = P.flatten(task.model.params)
  merged = P.flatten(_merged(adapter, frozen, state))
  assert float(pj.regularizer(adapter, state)) > 0.0
  for path in state:
    selected = np.zeros(base[path].size, bool)
    selected[_selected(frozen, path)] = True
    w, after = np.asarray(base[path]).ravel(), np.asarray(merged[path]).ravel()
    np.testing.assert_array_equal(after[~selected], w[~selected])  # bit-identical
    assert (after[selected] != w[selected]).mean() > 0.9, path  # and the selection trained
  moments = jax.tree.leaves(train_state.opt_state)
  assert sum(m.size for m in moments) <= 2 * pj.num_params(state) + 8


ELIGIBLE = {'embed/embedding', 'query/kernel', 'key/kernel', 'up/kernel'}  # min(shape) > 15


def _trained(adapter, seed):
  """The adapter's init on the classifier, its values moved as by training, and the dense
  float64 P of a target: the trained weights at the selection, zero elsewhere."""
  frozen, state = adapter.init(jax.random.key(0), Majority().model.params)
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda v: v + jnp.asarray(0.2 * rng.standard_normal(v.shape), v.dtype),
                       state)

  def dense(path, values=None):
    leaf, index = P.flatten(frozen)[path], _selected(frozen, path)
    w = np.asarray(leaf.w, np.float64).ravel()  # the merged weights, in numpy
    w[index] += np.asarray(state[path]['values'], np.float64)
    p = np.zeros(w.size)
    p[index] = w[index] if values is None else values
    return p.reshape(leaf.shape)

  return frozen, state, dense


def test_the_low_rank_term_is_the_mean_nuclear_norm_of_the_trained_sparse_matrices():
  """`rank_all`: lambda * mean over the matrices with min(shape) > rank_min_dim of the sum of
  the singular values of P, against numpy's SVD; its gradient against U V^T and central
  differences of the numpy term."""
  lam = 0.3
  adapter = pj.sara(KERNELS, threshold=0.15, lambda_rank=lam, rank_min_dim=15, rank_all=True)
  frozen, state, dense = _trained(adapter, seed=4)
  eligible = sorted(ELIGIBLE)

  def term(path=None, values=None):
    return lam * np.mean([np.linalg.svd(dense(p, values if p == path else None),
                                        compute_uv=False).sum() for p in eligible])

  assert float(pj.regularizer(adapter, state)) == pytest.approx(term(), rel=1e-5)
  grads = jax.grad(lambda s: pj.regularizer(adapter, s))(state)
  for path in state:
    index = _selected(frozen, path)
    if path not in eligible:
      assert not np.asarray(grads[path]['values']).any()
      continue
    u, _, vt = np.linalg.svd(dense(path), full_matrices=False)
    np.testing.assert_allclose(grads[path]['values'],
                               (lam / len(eligible) * u @ vt).ravel()[index], atol=1e-6)
  values = np.asarray(state['up/kernel']['values'], np.float64)
  for i in (0, 5, len(values) - 1):
    step = np.zeros_like(values)
    step[i] = 1e-6
    fd = (term('up/kernel', values + step) - term('up/kernel', values - step)) / 2e-6
    assert float(grads['up/kernel']['values'][i]) == pytest.approx(fd, rel=1e-3, abs=1e-7)


def test_each_step_takes_the_nuclear_norm_of_one_matrix_drawn_uniformly():
  """The official term: lambda * ||P_j||_* of one eligible matrix j per step; the gradient
  is lambda U V^T on that matrix's values alone, and every matrix is drawn."""
  lam = 0.3
  adapter = pj.sara(KERNELS, threshold=0.15, lambda_rank=lam, rank_min_dim=15)
  term = jax.jit(jax.value_and_grad(lambda s: pj.regularizer(adapter, s)))
  drawn = []
  for seed in range(12):
    frozen, state, dense = _trained(adapter, seed)
    value, grads = term(state)
    norms = {p: np.linalg.svd(dense(p), compute_uv=False).sum() for p in ELIGIBLE}
    j = min(norms, key=lambda p: abs(lam * norms[p] - float(value)))
    assert float(value) == pytest.approx(lam * norms[j], rel=1e-5)
    drawn.append(j)
    u, _, vt = np.linalg.svd(dense(j), full_matrices=False)
    for path in state:
      want = (lam * u @ vt).ravel()[_selected(frozen, j)] if path == j else 0.0
      np.testing.assert_allclose(grads[path]['values'], want, atol=1e-6)
  assert set(drawn) == ELIGIBLE, drawn
  # The draw from the state's bits is uniform over the matrices.
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = jax.jit(jax.vmap(lambda k: SR.draw({'a': jax.random.normal(k, (7,))}, 5)))(keys)
  counts = np.bincount(np.asarray(draws), minlength=5)
  assert counts.min() > 700 and counts.max() < 900, counts


def test_the_nuclear_norm_subgradient_drops_zero_singular_directions():
  rng = np.random.default_rng(2)
  u, _ = np.linalg.qr(rng.standard_normal((7, 7)))
  v, _ = np.linalg.qr(rng.standard_normal((5, 5)))
  x = (u[:, :2] * [3.0, 1.0]) @ v[:, :2].T  # rank 2
  np.testing.assert_allclose(SR.nuclear_norm(jnp.asarray(x, jnp.float32)), 4.0, rtol=1e-5)
  np.testing.assert_allclose(jax.grad(SR.nuclear_norm)(jnp.asarray(x, jnp.float32)),
                             u[:, :2] @ v[:, :2].T, atol=1e-5)
  assert not np.asarray(jax.grad(SR.nuclear_norm)(jnp.zeros((4, 3)))).any()


def test_progressive_reselection_keeps_trained_values_and_selects_what_stayed_below(tmp_path):
  """Phase 1 trains the entries below the threshold; `reselect` keeps every trained value
  and selects those of phase 1's selection whose trained |W| is still below it; phase 2
  (new optimiser moments, the same step function) moves those alone; `restate` gives the
  first selection's state of the result."""
  task, threshold = Majority(), 0.1
  adapter = pj.sara(KERNELS, threshold=threshold, lambda_rank=1e-3, rank_min_dim=0,
                    progressive=0.5)
  frozen, state = adapter.init(jax.random.key(0), task.model.params)
  tx = optax.adam(0.05)
  step = jax.jit(T.make_train_step(task, adapter, tx, seed=0))
  merge = jax.jit(functools.partial(pj.merge, adapter))

  def run(frozen, state, seeds):
    train_state = T.init_state({'adapter': state, 'head': {}}, tx)
    for b in seeds:
      batch = jax.tree.map(jnp.asarray, next(task.batches('train', 16, seed=b)))
      train_state, _ = step(train_state, frozen, batch)
    return train_state.trainable['adapter']

  state = run(frozen, state, range(4))
  phase1 = {p: np.asarray(v) for p, v in P.flatten(merge(frozen, state)).items()}
  frozen2, state2 = adapter.reselection.reselect(frozen, state)
  jax.tree.map(np.testing.assert_array_equal, merge(frozen2, state2),
               P.unflatten(phase1))  # every trained value kept
  dropped = kept = 0
  for path in state:
    old, new = _selected(frozen, path), _selected(frozen2, path)
    want = old[np.abs(phase1[path].ravel()[old]) < threshold]
    np.testing.assert_array_equal(new, want)
    dropped, kept = dropped + old.size - new.size, kept + new.size
  assert dropped > 20 and kept > 20, (dropped, kept)

  # The re-selected adapter saves and loads on the phase-1 weights.
  pj.save_adapter(tmp_path, adapter, frozen2, state2)
  _, frozen3, state3, _, _ = pj.load_adapter(tmp_path, P.unflatten(phase1))
  jax.tree.map(np.testing.assert_array_equal, (frozen3, state3), (frozen2, state2))

  state2 = run(frozen2, state2, range(4, 7))
  phase2 = P.flatten(merge(frozen2, state2))
  base = P.flatten(task.model.params)
  for path in state:
    new = np.zeros(phase1[path].size, bool)
    new[_selected(frozen2, path)] = True
    after = np.asarray(phase2[path]).ravel()
    np.testing.assert_array_equal(after[~new], phase1[path].ravel()[~new])
    outside = np.ones(new.size, bool)
    outside[_selected(frozen, path)] = False
    np.testing.assert_array_equal(after[outside], np.asarray(base[path]).ravel()[outside])
    assert (after[new] != phase1[path].ravel()[new]).mean() > 0.9, path
  restated = adapter.reselection.restate(frozen, frozen2, state2)
  jax.tree.map(np.testing.assert_array_equal, merge(frozen, restated), P.unflatten(phase2))


def test_bad_arguments_are_clear_errors():
  params = Majority().model.params
  with pytest.raises(ValueError, match='threshold must be a positive number'):
    pj.sara('kernel', threshold=0.0)
  with pytest.raises(ValueError, match='lambda_rank must be >= 0'):
    pj.sara('kernel', lambda_rank=-1.0)
  with pytest.raises(ValueError, match='rank_min_dim must be an int >= 0'):
    pj.sara('kernel', rank_min_dim=-1)
  with pytest.raises(ValueError, match=r'no entry of the targets has \|W\| < threshold 1e-12'):
    pj.sara('kernel', threshold=1e-12).init(jax.random.key(0), params)
  with pytest.raises(pj.PatternError):
    pj.sara('nothing_matches').init(jax.random.key(0), params)
  with pytest.raises(ValueError, match=r'fraction must be in \(0, 1\]'):
    SR.threshold_at(params, 'kernel', 1.5)
  adapter = pj.sara('kernel', threshold=0.1, rank_min_dim=0)
  _, state = adapter.init(jax.random.key(0), params)
  state['up/kernel'] = {'values': state['up/kernel']['values'][:-1]}
  with pytest.raises(ValueError, match='the low-rank term expects .* values for up/kernel'):
    pj.regularizer(adapter, state)
  assert pj.sara('kernel', lambda_rank=0.0).loss is None
  assert SR.sara_lr(2e-3) == pytest.approx(1e-3 * np.exp(-0.7))


@pytest.fixture(scope='module')
def progressive_run(tmp_path_factory):
  """A tiny BERT run of the study's `sara` config, re-selected after 3 of its 10 steps."""
  workdir = tmp_path_factory.mktemp('sara_progressive')
  return workdir, train(_progressive(tiny('sara')), workdir)


def _progressive(config):
  config.method.progressive = 0.3  # round(0.3 * 10 steps): after step 3
  return config


def test_a_run_selects_again_and_the_entries_left_out_stay_as_trained(progressive_run):
  """After the re-selection the entries of the first selection that grew to |W| >= threshold
  keep their trained values bit for bit (no gradient, no weight decay), those still below
  train on, and the best adapter is saved in init's selection, merged values included."""
  workdir, summary = progressive_run
  params = tasks.build(tiny('sara')).model.params
  adapter, frozen, at_reselect, _, _ = pj.load_adapter(workdir / 'reselected', params)
  _, frozen_best, best, _, _ = pj.load_adapter(workdir / 'adapter', params)
  assert summary['best_epoch'] >= 1  # after step 5: after the re-selection
  threshold = adapter.config['threshold']
  kept = moved = 0
  for path, st in at_reselect.items():
    np.testing.assert_array_equal(_selected(frozen_best, path), _selected(frozen, path))
    before, after = np.asarray(st['values']), np.asarray(best[path]['values'])
    fixed = np.abs(before) >= threshold
    np.testing.assert_array_equal(after[fixed], before[fixed])
    kept, moved = kept + fixed.sum(), moved + (after[~fixed] != before[~fixed]).sum()
    assert (after[~fixed] != before[~fixed]).mean() > 0.9, path
  assert kept > 5 and moved > 100, (kept, moved)
  head = sum(v.size for k, v in adapter_tensors(workdir).items() if k.startswith('head/'))
  assert summary['trainable_params'] == pj.num_params(best) + head


def test_a_run_resumed_after_the_re_selection_continues_bit_exactly(progressive_run, tmp_path):
  reference, summary = progressive_run
  with pytest.raises(SystemExit, match='halted at step 7'):
    train(_progressive(tiny('sara')), tmp_path, halt_at_step=7)  # after the step-6 checkpoint
  resumed = train(_progressive(tiny('sara')), tmp_path, resume=True)
  assert train_losses(tmp_path) == train_losses(reference)
  assert resumed['test_accuracy'] == summary['test_accuracy']
  a, b = adapter_tensors(tmp_path), adapter_tensors(reference)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_the_method_optimiser_starts_again_with_the_schedule_going_on():
  """`restart_adapter`: the adapter's first update after a restart is Adam's first step
  (lr(t) * g / (|g| + eps), bias-corrected moments started again) at the schedule's current
  lr(t), not its start; the head's AdamW state is left as it was."""
  config = ml_collections.ConfigDict({
      'lr': 0.1, 'weight_decay': 0.0, 'b1': 0.9, 'b2': 0.999, 'eps': 1e-8,
      'schedule': 'cosine', 'warmup_steps': 2, 'clip_norm': 0.0, 'head_lr_scale': 1.0})
  total = 20
  tx = T.make_optimizer(config, pj.sparse_ft('kernel'), total)
  rng = np.random.default_rng(0)
  params = {'adapter': {'w': {'values': jnp.asarray(rng.normal(size=6), jnp.float32)}},
            'head': {'kernel': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}}

  def grads(tree):
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), tree)

  state = tx.init(params)
  for _ in range(7):
    updates, state = tx.update(grads(params), state, params)
    params = optax.apply_updates(params, updates)
  smaller = {**params, 'adapter': {'w': {'values': params['adapter']['w']['values'][:4]}}}
  restarted = T.restart_adapter(state, tx.init(smaller))
  g = grads(smaller)
  updates, after = tx.update(g, restarted, smaller)
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, total)(7)
  gw = np.asarray(g['adapter']['w']['values'])
  np.testing.assert_allclose(updates['adapter']['w']['values'], -lr * gw / (np.abs(gw) + 1e-8),
                             rtol=1e-5)
  # The head's update is the one it would have had without the restart.
  np.testing.assert_array_equal(updates['head']['kernel'],
                                tx.update({**g, 'adapter': grads(params['adapter'])}, state,
                                          params)[0]['head']['kernel'])
  assert int(after.adapter[0][0].count) == 1 and int(after.head[0][0].count) == 8


def test_a_chain_cannot_hold_a_progressive_method():
  with pytest.raises(ValueError, match='a chain cannot select again partway through a run'):
    pj.chain(pj.lora('kernel', rank=2), pj.sara('kernel', progressive=0.5))
  with pytest.raises(ValueError, match=r'progressive must be a fraction of the run in \[0, 1\)'):
    pj.sara('kernel', progressive=1.0)
  assert pj.sara('kernel').reselection is None
  assert pj.sara('kernel', progressive=0.5).reselection.at == 0.5
