"""LoRA-Pro: the closed form against independent least-squares solves, and training with it."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import scipy.linalg

import peftjax as pj
from peftjax import methods
from peftjax.methods.lora_pro import lora_pro, scales
from peftjax.optim.lora_pro import adjusted_grads, lora_pro_adamw
from peftjax.optim.lora_pro import lora_pro as lora_pro_transform
from peftjax.train.step import make_optimizer


def problem(seed, n=7, m=5, r=2):
  """Random A (n, r), B (r, m), full gradient G (n, m) and LoRA's (g_A, g_B), in float64."""
  rng = np.random.default_rng(seed)
  s = rng.uniform(0.5, 3.0)
  a, b, g = rng.normal(size=(n, r)), rng.normal(size=(r, m)), rng.normal(size=(n, m))
  return s, a, b, g, s * g @ b.T, s * a.T @ g


def adjusted(s, a, b, g_a, g_b, **kwargs):
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  out = adjusted_grads(f32(g_a), f32(g_b), f32(a), f32(b), s, damping=0.0, **kwargs)
  return [np.asarray(x, np.float64) for x in out]


def lowrank_map(s, a, b):
  """The matrix L of (ĝ_A, ĝ_B) -> vec s(ĝ_A·B + A·ĝ_B)."""
  (n, r), m = a.shape, b.shape[1]
  cols = [(s * np.eye(n * r)[k].reshape(n, r) @ b).ravel() for k in range(n * r)]
  cols += [(s * a @ np.eye(r * m)[k].reshape(r, m)).ravel() for k in range(r * m)]
  return np.stack(cols, 1)


def split(z, n, r):
  return z[:n * r].reshape(n, r), z[n * r:].reshape(r, -1)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_closed_form_is_the_least_squares_solution_closest_to_lora(seed):
  s, a, b, g, g_a, g_b = problem(seed)
  lmap, lora_grads = lowrank_map(s, a, b), np.concatenate([g_a.ravel(), g_b.ravel()])
  # Theorem 2.1: any least-squares solution of L z = vec G; 2.2: the one nearest LoRA's grads.
  best = lora_grads + np.linalg.pinv(lmap) @ (g.ravel() - lmap @ lora_grads)
  min_residual = np.linalg.norm(lmap @ best - g.ravel())
  for x_mode in ('zero', 'sylvester'):
    ga, gb = adjusted(s, a, b, g_a, g_b, x_mode=x_mode)
    residual = np.linalg.norm(s * (ga @ b + a @ gb) - g)
    np.testing.assert_allclose(residual, min_residual, rtol=1e-5)
  np.testing.assert_allclose(np.concatenate([ga.ravel(), gb.ravel()]), best, atol=2e-5)
  zero = np.concatenate([x.ravel() for x in adjusted(s, a, b, g_a, g_b, x_mode='zero')])
  assert np.linalg.norm(best - lora_grads) < np.linalg.norm(zero - lora_grads) - 1e-3


@pytest.mark.parametrize('seed', [3, 4])
def test_matches_the_papers_formulas_in_torch_layout(seed):
  s, a, b, g, g_a, g_b = problem(seed, n=6, m=8, r=3)
  # torch: W_t = W0 + s·B_t@A_t with B_t (out, r) = Bᵀ, A_t (r, in) = Aᵀ.
  at, bt = a.T, b.T
  g_at, g_bt = g_a.T, g_b.T
  btb_inv, aat_inv = np.linalg.inv(bt.T @ bt), np.linalg.inv(at @ at.T)
  x = scipy.linalg.solve_sylvester(bt.T @ bt, at @ at.T, -btb_inv @ g_at @ at.T / s**2)
  paper_a = btb_inv @ g_at / s**2 + x @ at
  paper_b = (np.eye(len(bt)) - bt @ btb_inv @ bt.T) @ g_bt @ aat_inv / s**2 - bt @ x
  ga, gb = adjusted(s, a, b, g_a, g_b)
  np.testing.assert_allclose(ga, paper_a.T, atol=2e-5)
  np.testing.assert_allclose(gb, paper_b.T, atol=2e-5)


@pytest.mark.parametrize('seed', [5, 6, 7])
def test_lowrank_step_is_closer_to_the_full_gradient_than_loras(seed):
  s, a, b, g, g_a, g_b = problem(seed, n=12, m=9, r=3)
  ga, gb = adjusted(s, a, b, g_a, g_b)
  pro = np.linalg.norm(s * (ga @ b + a @ gb) - g)
  lora_equiv = s * (g_a @ b + a @ g_b)
  best_scale = np.sum(lora_equiv * g) / np.sum(lora_equiv ** 2)  # LoRA at its best step size
  assert pro < np.linalg.norm(lora_equiv - g)
  assert pro < np.linalg.norm(best_scale * lora_equiv - g) - 1e-3
  # ... and it is G's orthogonal projection onto {X·B + A·Y}.
  pa, pb = a @ np.linalg.pinv(a), np.linalg.pinv(b) @ b
  np.testing.assert_allclose(s * (ga @ b + a @ gb), g @ pb + pa @ g @ (np.eye(9) - pb),
                             atol=2e-5)


def test_zero_initialised_b_gives_finite_gradients():
  s, a, _, g, _, _ = problem(8)
  b = np.zeros((2, 5))
  ga, gb = adjusted_grads(*(jnp.asarray(x, jnp.float32) for x in
                            (s * g @ b.T, s * a.T @ g, a, b)), s)
  np.testing.assert_array_equal(ga, 0.0)
  np.testing.assert_allclose(gb, np.linalg.solve(a.T @ a, a.T @ g) / s, rtol=1e-4, atol=1e-5)


def tiny_params(seed, n=8, m=6):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {'enc': {'query': {'kernel': jax.random.normal(k1, (n, m)) / 3},
                  'value': {'kernel': jax.random.normal(k2, (n, m)) / 3,
                            'bias': jax.random.normal(k3, (m,))}}}


def randomized(state, seed):
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


def test_transform_adjusts_every_target_with_its_own_scale():
  adapter = lora_pro('kernel', rank=2, alpha=4.0, alpha_pattern={'value': 1.0})
  _, state = adapter.init(jax.random.key(0), tiny_params(0))
  state, grads = randomized(state, 1), randomized(state, 2)
  updates, _ = adapter.tx.update(grads, adapter.tx.init(state), state)
  for path, s in [('enc/query/kernel', 2.0), ('enc/value/kernel', 0.5)]:
    assert scales(adapter.config)(path) == s
    want = adjusted_grads(grads[path]['a'], grads[path]['b'], state[path]['a'],
                          state[path]['b'], s)
    np.testing.assert_allclose(updates[path]['a'], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates[path]['b'], want[1], rtol=1e-5, atol=1e-6)
  by_dict = lora_pro_transform({'enc/query/kernel': 2.0, 'enc/value/kernel': 0.5})
  jax.tree.map(np.testing.assert_array_equal, by_dict.update(grads, None, state)[0], updates)


def test_transform_errors_are_clear():
  tx = lora_pro_transform(2.0)
  state = {'w': {'a': jnp.ones((4, 2)), 'b': jnp.ones((2, 3))}}
  with pytest.raises(ValueError, match='needs the current params'):
    tx.update(state, tx.init(state))
  with pytest.raises(ValueError, match='LoRA states'):
    tx.update({**state, 'head': jnp.ones(3)}, None, {**state, 'head': jnp.ones(3)})
  with pytest.raises(KeyError, match='no scale'):
    lora_pro_transform({'v': 1.0}).update(state, None, state)
  with pytest.raises(ValueError, match='x_mode'):
    lora_pro('kernel', x_mode='symmetric')


def opt_config(**kw):
  return ml_collections.ConfigDict({'lr': 1e-2, 'weight_decay': 0.0, 'b1': 0.9, 'b2': 0.999,
                                    'eps': 1e-8, 'schedule': 'constant', 'warmup_steps': 0,
                                    'clip_norm': 0.0, **kw})


def test_make_optimizer_adjusts_then_runs_adamw():
  adapter = lora_pro('kernel', rank=2, alpha=4.0)
  _, state = adapter.init(jax.random.key(0), tiny_params(0))
  state = randomized(state, 1)
  head = {'kernel': jnp.ones((6, 3)), 'bias': jnp.zeros(3)}
  trainable = {'adapter': state, 'head': head}
  grads = {'adapter': randomized(state, 2), 'head': randomized(head, 3)}
  tx = make_optimizer(opt_config(), adapter)
  updates, _ = jax.jit(tx.update)(grads, tx.init(trainable), trainable)
  adjusted_tree = adapter.tx.update(grads['adapter'], None, state)[0]
  first_adam = lambda g: -1e-2 * g / (jnp.abs(g) + 1e-8)  # AdamW's first step, no decay
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, first_adam(g), rtol=1e-4, atol=1e-7),
               updates, {'adapter': adjusted_tree, 'head': grads['head']})
  # The adjustment changes the direction AdamW sees (not only magnitudes).
  assert not np.allclose(np.sign(adjusted_tree['enc/query/kernel']['a']),
                         np.sign(grads['adapter']['enc/query/kernel']['a']))


def test_chained_with_other_methods_it_adjusts_only_its_own_state():
  adapter = pj.chain(pj.lora('query/kernel', rank=2), lora_pro('value/kernel', rank=2))
  _, states = adapter.init(jax.random.key(0), tiny_params(0))
  states, grads = randomized(states, 1), randomized(states, 2)
  tx = pj.transform(adapter, 1e-3)  # a chain's transform is built for the optimiser's lr
  updates, _ = tx.update(grads, tx.init(states), states)
  jax.tree.map(np.testing.assert_array_equal, updates[0], grads[0])
  want = lora_pro_transform(8.0).update(grads[1], None, states[1])[0]  # 16 / 2
  jax.tree.map(np.testing.assert_array_equal, updates[1], want)


def test_chain_with_a_tx_under_make_optimizer_adjusts_only_its_own_state():
  first, second = pj.lora('query/kernel', rank=2), lora_pro('value/kernel', rank=2)
  adapter = pj.chain(first, second)
  _, states = adapter.init(jax.random.key(0), tiny_params(0))
  states, grads = randomized(states, 1), randomized(states, 2)
  head = {'bias': jnp.zeros(3)}

  def first_step(adapter, state, grad):
    trainable = {'adapter': state, 'head': head}
    tx = make_optimizer(opt_config(), adapter)
    return tx.update({'adapter': grad, 'head': {'bias': jnp.ones(3)}}, tx.init(trainable),
                     trainable)[0]['adapter']

  chained = first_step(adapter, states, grads)
  for i, alone in enumerate((first, second)):
    jax.tree.map(np.testing.assert_allclose, chained[i], first_step(alone, states[i], grads[i]))


def regression(seed, n=10, m=8, batch=64):
  """A frozen linear layer and targets from a changed weight (a full-rank change)."""
  kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, n))
  w = jax.random.normal(kw, (n, m)) / np.sqrt(n)
  y = x @ (w + 0.5 * jax.random.normal(kd, (n, m)) / np.sqrt(n))
  return {'layer': {'kernel': w}}, x, y


def train(adapter, tx, steps, seed=0):
  params, x, y = regression(seed)
  frozen, state = adapter.init(jax.random.key(seed), params)

  def loss_fn(state):
    return jnp.mean((x @ pj.merge(adapter, frozen, state)['layer']['kernel'] - y) ** 2)

  @jax.jit
  def step(state, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss

  opt_state, losses = tx.init(state), []
  for _ in range(steps):
    state, opt_state, loss = step(state, opt_state)
    losses.append(float(loss))
  return np.array(losses + [float(loss_fn(state))])


@pytest.mark.parametrize('variant', ['sgd', 'make_optimizer', 'adamw_equivalent'])
def test_training_reduces_the_loss(variant):
  adapter = lora_pro('layer/kernel', rank=4, alpha=8.0)
  if variant == 'sgd':
    tx = optax.chain(adapter.tx, optax.sgd(0.05))
  elif variant == 'make_optimizer':  # the adapter alone is trained: wrap it as the trainer does
    full = make_optimizer(opt_config(lr=0.02), adapter)
    tx = optax.GradientTransformation(
        lambda p: full.init({'adapter': p, 'head': {}}),
        lambda g, s, p: (lambda u, s: (u['adapter'], s))(
            *full.update({'adapter': g, 'head': {}}, s, {'adapter': p, 'head': {}})))
  else:
    tx = lora_pro_adamw(scales(adapter.config), 0.02, weight_decay=0.01)
  losses = train(adapter, tx, 60)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_adamw_equivalent_variant_keeps_full_size_moments_and_decays_ab():
  adapter = lora_pro('kernel', rank=2, alpha=4.0)
  _, state = adapter.init(jax.random.key(0), tiny_params(0))
  state, grads = randomized(state, 1), randomized(state, 2)
  tx = lora_pro_adamw(scales(adapter.config), 0.1, weight_decay=0.5)
  opt_state = tx.init(state)
  assert opt_state.mu['enc/value/kernel'].shape == (8, 6)
  zero = jax.tree.map(jnp.zeros_like, grads)
  updates, _ = tx.update(zero, opt_state, state)  # no gradient: only the decay of A@B
  jax.tree.map(lambda u, p: np.testing.assert_allclose(u, (np.sqrt(0.95) - 1) * p, rtol=1e-5),
               updates, state)
  updates, new_state = jax.jit(tx.update)(grads, opt_state, state)
  path = 'enc/query/kernel'
  a, b, s = state[path]['a'], state[path]['b'], 2.0
  ga, gb = adjusted_grads(grads[path]['a'], grads[path]['b'], a, b, s, x_mode='zero')
  equiv = s * (ga @ b + a @ gb)
  np.testing.assert_allclose(new_state.mu[path], 0.1 * equiv, rtol=1e-4, atol=1e-6)
  d = equiv / (jnp.abs(equiv) + 1e-8)  # Adam's first direction
  want = adjusted_grads(s * d @ b.T, s * a.T @ d, a, b, s)
  np.testing.assert_allclose(updates[path]['a'], -0.1 * want[0] + (np.sqrt(0.95) - 1) * a,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(updates[path]['b'], -0.1 * want[1] + (np.sqrt(0.95) - 1) * b,
                             rtol=1e-4, atol=1e-5)


def test_from_config_rebuilds_it():
  adapter = lora_pro('kernel', rank=2, alpha=4.0, rslora=True, x_mode='zero', damping=1e-6,
                     rank_pattern={'value': 3})
  config = json.loads(json.dumps(adapter.config))
  assert config['method'] == 'lora_pro' and methods.REGISTRY['lora_pro'] is lora_pro
  rebuilt = methods.from_config(config)
  assert rebuilt.config == adapter.config
  p = tiny_params(0)
  _, state = adapter.init(jax.random.key(0), p)
  _, state2 = rebuilt.init(jax.random.key(0), p)
  state, grads = randomized(state, 1), randomized(state, 2)
  assert state['enc/value/kernel']['a'].shape == (8, 3)
  assert scales(config)('enc/value/kernel') == 4.0 / np.sqrt(3)
  jax.tree.map(np.testing.assert_array_equal, rebuilt.tx.update(grads, None, state)[0],
               adapter.tx.update(grads, None, state)[0])


def test_raw_gradients_are_clipped_before_the_adjustment(optimizer_input):
  """As the authors' trainer: clip the raw gradients (adapter and head together), then adjust.
  A small B makes the adjusted A gradient far larger than the raw one, so clipping after the
  adjustment would crush the head's gradient."""
  adapter = lora_pro('kernel', rank=2, alpha=4.0)
  _, state = adapter.init(jax.random.key(0), tiny_params(0))
  state = jax.tree.map(lambda x: x * 0.05, randomized(state, 1))
  raw = {'adapter': randomized(state, 2), 'head': {'kernel': jnp.full((3, 2), 0.5)}}
  trainable = {'adapter': state, 'head': {'kernel': jnp.zeros((3, 2))}}
  norm, clip = float(optax.tree.norm(raw)), 0.5
  factor = clip / norm
  clipped = jax.tree.map(lambda g: g * factor, raw['adapter'])
  want = adapter.tx.update(clipped, None, state)[0]
  assert float(optax.tree.norm(want)) > 10 * float(optax.tree.norm(clipped))
  got = optimizer_input(adapter, raw, trainable, clip_norm=clip)
  np.testing.assert_allclose(got['head']['kernel'], raw['head']['kernel'] * factor, rtol=1e-4)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-6),
               got['adapter'], want)
