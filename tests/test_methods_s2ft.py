"""S²FT (`peftjax.methods.s2ft`): co-permutation keeps the function of the bundled BERT and
the grouped-query LLaMA, only the selected rows / columns train, the step forms only their
weight gradient, and the update decouples into a sparse difference that fuses and switches."""
from __future__ import annotations

import contextlib
import functools
import io
import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals

import peftjax as pj
from peftjax import models
from peftjax.core import paths as P
from peftjax.core.leaves import SparseDelta
from peftjax.methods.s2ft import co_permute, decouple, select, unpermute
from peftjax.methods.sparse import compose, negate
from peftjax.tasks.base import Task
from peftjax.train import step as T
from test_tasks_custom_model import _dot_shapes

HEADS = 4  # both tiny models; TINY_LLAMA groups them in 2 key/value heads
SIZES = {'bert': models.TINY_BERT, 'llama': models.TINY_LLAMA}
MODULES = {'bert': {'v': 'attention/value', 'o': 'attention/output', 'u': 'intermediate',
                    'd': 'output', 'block': 'encoder/layer_{}'},
           'llama': {'v': 'self_attn/v_proj', 'o': 'self_attn/o_proj', 'u': 'mlp/up_proj',
                     'd': 'mlp/down_proj', 'block': 'layers_{}'}}
HEAD_DIM = 8


@functools.lru_cache(maxsize=None)
def model(kind):
  """The tiny model with every param redrawn (biases, norms too), so that each one counts."""
  m = models.build(ml_collections.ConfigDict(SIZES[kind]))
  rng = np.random.default_rng(7)
  params = jax.tree.map(lambda x: jnp.asarray(x + 0.3 * rng.standard_normal(x.shape), x.dtype),
                        m.params)
  return m._replace(params=params)


def inputs(kind, seed):
  """Fresh random inputs: token ids (and a BERT mask with padding)."""
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, 64, (2, 12)), jnp.int32)
  if kind == 'llama':
    return (ids,)
  mask = jnp.asarray(np.arange(12)[None, :] < np.array([[12], [9]]), jnp.int32)
  return ids, mask


@functools.lru_cache(maxsize=None)
def _forward(kind):
  return jax.jit(model(kind).apply)


def run(kind, params, seed=0):
  return _forward(kind)(params, *inputs(kind, seed))


def kernel(kind, block, role):
  return f"{MODULES[kind]['block'].format(block)}/{MODULES[kind][role]}/kernel"


class Fit(Task):
  """Regress the model's outputs on a fixed random target (one batch)."""

  def __init__(self, kind):
    self.kind, self.model = kind, model(kind)
    target = np.random.default_rng(1).standard_normal(run(kind, self.model.params).shape)
    self.batch = {'inputs': inputs(kind, 2), 'target': jnp.asarray(target, jnp.float32),
                  'weights': jnp.ones(2)}

  def num_batches(self, split, batch_size):
    return 1

  def batches(self, split, batch_size, **kwargs):
    yield self.batch

  def loss(self, params, head, batch, *, rng=None):
    out = self.model.apply(params, *batch['inputs'])
    return jnp.mean((out - batch['target']) ** 2)

  def eval_sums(self, params, head, batch):
    return {'loss': self.loss(params, head, batch), 'count': jnp.ones(())}


def train(kind, adapter, steps=3):
  """`steps` Adam steps of the trainer's train step."""
  task = Fit(kind)
  frozen, state = adapter.init(jax.random.key(0), task.model.params)
  tx = optax.adam(1e-2)
  step = jax.jit(T.make_train_step(task, adapter, tx, seed=0))
  train_state = T.init_state({'adapter': state, 'head': {}}, tx)
  for _ in range(steps):
    train_state, _ = step(train_state, frozen, task.batch)
  return frozen, train_state.trainable['adapter']


# Selections that move every coupled weight: heads selected for v only, for v and o, for o
# only; in LLaMA the key/value groups (heads 0-1, 2-3) swap and heads reorder inside them.
SELECTIONS = {
    'bert': {'encoder/layer_0': {'v': [3], 'o': [1, 3], 'u': [5, 40], 'd': [40, 63, 7]},
             'encoder/layer_1': {'o': [2], 'd': [0, 33]}},
    'llama': {'layers_0': {'v': [1], 'o': [3, 0], 'u': [9], 'd': [9, 2]},
              'layers_1': {'o': [2], 'u': [60, 3]}},
}


@pytest.mark.parametrize('kind', ['bert', 'llama'])
def test_co_permutation_keeps_the_function_and_inverts_exactly(kind):
  params = model(kind).params
  permuted = co_permute(params, SELECTIONS[kind], HEADS)
  flat, moved = P.flatten(params), P.flatten(permuted)
  coupled = {p for p in flat if any(f'/{m}/' in f'/{p}' for m in (
      'query', 'key', 'value', 'attention/output', 'intermediate', 'layer_0/output',
      'layer_1/output', 'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
      'down_proj'))}
  for path in flat:
    if path in coupled and not path.endswith(('output/bias', 'norm/bias')):
      assert not np.array_equal(moved[path], flat[path]), path  # every coupled weight moved
    else:
      np.testing.assert_array_equal(moved[path], flat[path], err_msg=path)
  for seed in (3, 4):
    base = run(kind, params, seed)
    np.testing.assert_allclose(run(kind, permuted, seed), base, atol=1e-5)
  restored = co_permute(permuted, SELECTIONS[kind], HEADS, inverse=True)
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, restored, params)


@pytest.mark.parametrize('kind', ['bert', 'llama'])
def test_host_params_are_permuted_on_the_host(kind):
  """A model's loaded (numpy) params are permuted in numpy, with no device copy, and device
  params on the device: the same trees either way."""
  device = model(kind).params
  host = jax.tree.map(np.asarray, device)
  adapter = pj.s2ft(HEADS, v_ratio=0.5, o_ratio=0.5, u_ratio=0.1, d_ratio=0.1, seed=1)
  on_host, _ = adapter.init(jax.random.key(0), host)
  on_device, _ = adapter.init(jax.random.key(0), device)
  arrays = lambda tree: {p: x.w if isinstance(x, SparseDelta) else x
                         for p, x in P.flatten(tree).items()}
  base, h, d = arrays(host), arrays(on_host), arrays(on_device)
  moved = [p for p in base if h[p] is not base[p]]
  assert len(moved) >= 12, moved  # q, k, v, o, up, down (and biases) of both blocks
  for path in moved:
    assert isinstance(h[path], np.ndarray) and isinstance(d[path], jax.Array), path
    np.testing.assert_array_equal(h[path], d[path], err_msg=path)
  for tree, kind_of in ((host, np.ndarray), (device, jax.Array)):
    permuted = co_permute(tree, SELECTIONS[kind], HEADS)
    assert all(isinstance(x, kind_of) for x in jax.tree.leaves(permuted))
    jax.tree.map(np.testing.assert_array_equal,
                 co_permute(permuted, SELECTIONS[kind], HEADS, inverse=True), tree)


def _rows_of(kind, role, ids):
  """The base's rows (o, d) or columns (v, u) of the selected heads / channels."""
  ids = np.asarray(ids)
  return (ids[:, None] * HEAD_DIM + np.arange(HEAD_DIM)).reshape(-1) if role in 'vo' else ids


@pytest.mark.parametrize('kind', ['bert', 'llama'])
def test_the_selected_parts_become_contiguous_blocks(kind):
  """v / up columns lead; o / down rows follow the v-only / up-only parts; with the default
  v_ratio = u_ratio = 0 they lead (`arange(k)`); in grouped-query attention a selected head
  leads its group. The blocks hold exactly the selected heads' and channels' weights."""
  params = model(kind).params
  adapter = pj.s2ft(HEADS, v_ratio=0.5, o_ratio=0.5, u_ratio=0.2, d_ratio=0.2, seed=5)
  sel = select(params, HEADS, v_ratio=0.5, o_ratio=0.5, u_ratio=0.2, d_ratio=0.2, seed=5)
  frozen, _ = adapter.init(jax.random.key(0), params)
  flat, base = P.flatten(frozen), P.flatten(params)
  for b in range(2):
    s = sel[MODULES[kind]['block'].format(b)]
    group = 2 if kind == 'llama' else 1
    only_v = len(set(s['v'].tolist()) - set((s['o'] // group).tolist()))
    only_u = len(set(s['u'].tolist()) - set(s['d'].tolist()))
    starts = {'v': 0, 'u': 0, 'o': only_v * group * HEAD_DIM, 'd': only_u}
    for role in 'vuod':
      if not s[role].size:
        continue
      leaf, axis = flat[kernel(kind, b, role)], 0 if role in 'od' else 1
      index = np.asarray(leaf.index)
      if kind == 'bert' or role != 'o':
        np.testing.assert_array_equal(index, starts[role] + np.arange(index.size))
      else:  # whole heads, each selected one before the others of its group
        heads = index[::HEAD_DIM] // HEAD_DIM
        np.testing.assert_array_equal(index, _rows_of(kind, 'o', heads))
        assert all(q in heads for h in heads for q in range(h - h % group, h)), heads
      got = np.moveaxis(np.asarray(leaf.w), axis, 0)[index]
      want = np.moveaxis(np.asarray(base[kernel(kind, b, role)]), axis, 0)
      want = want[_rows_of(kind, role, s[role])]
      assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist())), (b, role)
  rows_only = pj.s2ft(HEADS, o_ratio=0.5, d_ratio=0.2, seed=5)
  frozen, _ = rows_only.init(jax.random.key(0), params)
  for path, leaf in P.flatten(frozen).items():
    if isinstance(leaf, SparseDelta) and (kind == 'bert' or 'down' in path):
      np.testing.assert_array_equal(leaf.index, np.arange(leaf.index.shape[0]), err_msg=path)


@pytest.mark.parametrize('kind', ['bert', 'llama'])
def test_only_the_selected_rows_move_after_train_steps(kind):
  ratios = {'v_ratio': 0.25, 'o_ratio': 0.5, 'u_ratio': 0.1, 'd_ratio': 0.1}
  adapter = pj.s2ft(HEADS, **ratios, seed=1)
  frozen, state = train(kind, adapter)
  params = model(kind).params
  sel = select(params, HEADS, **ratios, seed=1)
  # In the base's order: only the selected heads' / channels' rows (columns) changed.
  fused = P.flatten(unpermute(adapter, pj.merge(adapter, frozen, state)))
  trained = set()
  for path, w in P.flatten(params).items():
    changed = np.asarray(fused[path]) != np.asarray(w)
    chosen = np.zeros(w.shape, bool)
    for block, s in sel.items():
      for role in 'vuod':
        if path == kernel(kind, int(block[-1]), role) and s[role].size:
          rows = _rows_of(kind, role, s[role])
          if role in 'od':
            chosen[rows] = True
          else:
            chosen[:, rows] = True
          trained.add(path)
    assert not (changed & ~chosen).any(), path  # bit-identical outside the selection
    if chosen.any():
      assert changed[chosen].mean() > 0.9, path  # and the selection trained
  assert trained == set(state) and {'o', 'd', 'v', 'u'} == {
      r for s in sel.values() for r in 'vuod' if s[r].size}
  # Switched off, the adapter leaves the base exactly as it was.
  off = jax.tree.map(jnp.zeros_like, state)
  jax.tree.map(np.testing.assert_array_equal,
               unpermute(adapter, pj.merge(adapter, frozen, off)), params)


def test_the_step_forms_only_the_selected_rows_weight_gradient():
  """Rows of W_o and W_down train: the step's products include their (k, hidden) weight
  gradients and nothing of a kernel's shape (full fine-tuning's step has those)."""
  task = Fit('bert')
  adapter = pj.s2ft(HEADS, o_ratio=0.25, d_ratio=0.1, seed=2)
  frozen, state = adapter.init(jax.random.key(0), task.model.params)
  tx = optax.adam(1e-3)

  def shapes(adapter, frozen, state):
    jaxpr = jax.make_jaxpr(T.make_train_step(task, adapter, tx, seed=0))(
        T.init_state({'adapter': state, 'head': {}}, tx), frozen, task.batch)
    return set(_dot_shapes(jaxpr.jaxpr))

  got = shapes(adapter, frozen, state)
  kernels = {tuple(v.shape) for p, v in P.flatten(task.model.params).items()
             if p.endswith('kernel')}
  assert not kernels & got, sorted(got)
  rows = {tuple(st['values'].shape) for st in state.values()}
  assert all(r[1] == 32 and r[0] < 32 for r in rows), rows
  assert all(r in got or r[::-1] in got for r in rows), (rows, sorted(got))  # (k, 32) or its .T
  full = pj.full()
  frozen_f, state_f = full.init(jax.random.key(0), task.model.params)
  assert kernels <= shapes(full, frozen_f, state_f)


def test_the_backward_pass_keeps_only_the_selected_columns_of_a_trained_rows_input():
  """Of the inputs of W_o and W_down (attention context, FFN activation) the backward pass
  keeps only the selected heads' / channels' columns, as the official S2ColumnLinear saves
  its input's slice; full fine-tuning keeps them whole for its weight gradients."""
  task = Fit('bert')

  def residuals(adapter):
    frozen, state = adapter.init(jax.random.key(0), task.model.params)
    loss = lambda st: task.loss(T.adapted(adapter, frozen, st), {}, task.batch)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      print_saved_residuals(loss, state)
    found = re.findall(r'f32\[([\d,]+)\]', out.getvalue())
    return {tuple(map(int, s.split(','))) for s in found}, state

  tokens = task.batch['inputs'][0].size
  whole = {(tokens, 32), (tokens, 64)}  # the inputs of W_o and W_down, whole
  got, state = residuals(pj.s2ft(HEADS, o_ratio=0.25, d_ratio=0.1, seed=2))
  assert not whole & got, sorted(got)
  assert {(tokens, st['values'].shape[0]) for st in state.values()} <= got, sorted(got)
  assert whole <= residuals(pj.full())[0]


def test_the_update_decouples_into_an_adapter_that_fuses_and_switches():
  """`decouple` gives each task's update in the base's order: fused into the base it is the
  structured model; taking it off and fusing another task switches between them."""
  params = model('bert').params
  tasks = {}
  for seed in (1, 2):
    adapter = pj.s2ft(HEADS, v_ratio=0.5, o_ratio=0.5, u_ratio=0.1, d_ratio=0.1, seed=seed)
    frozen, state = adapter.init(jax.random.key(0), params)
    keys = iter(jax.random.split(jax.random.key(seed), 100))
    state = jax.tree.map(lambda v: 0.5 * jax.random.normal(next(keys), v.shape), state)
    tasks[seed] = adapter, frozen, state, decouple(adapter, frozen, state)
  adapter, frozen, state, diff = tasks[1]
  # Somewhere a head selected for v and o precedes a lower one selected for o alone, so the
  # trained rows are not in the base's order there: decouple reorders the values.
  sel = select(params, HEADS, v_ratio=0.5, o_ratio=0.5, u_ratio=0.1, d_ratio=0.1, seed=1)
  both = lambda s: set(s['v'].tolist()) & set(s['o'].tolist())
  assert any(max(both(s), default=-1) > min(set(s['o'].tolist()) - both(s), default=9)
             for s in sel.values()), sel
  for d in diff.values():  # sorted, unique positions, as `SparseDelta` holds them
    assert (np.diff(np.asarray(d.index)) > 0).all()
  fused = compose(params, diff)
  jax.tree.map(np.testing.assert_array_equal, fused,
               unpermute(adapter, pj.merge(adapter, frozen, state)))
  structured = run('bert', adapter.apply(frozen, state), seed=5)
  np.testing.assert_allclose(run('bert', fused, seed=5), structured, atol=1e-5)
  assert np.abs(structured - run('bert', params, seed=5)).max() > 1e-2
  # Switch to task 2 on the fused tree: off with task 1's difference, on with task 2's.
  adapter2, frozen2, state2, diff2 = tasks[2]
  switched = compose(compose(fused, negate(diff)), diff2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               switched, compose(params, diff2))
  np.testing.assert_allclose(run('bert', switched, seed=5),
                             run('bert', adapter2.apply(frozen2, state2), seed=5), atol=1e-5)
  # Switched off entirely, the base comes back (up to rounding of (w + v) - v).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               compose(fused, negate(diff)), params)


def test_the_draw_takes_the_official_counts_over_all_blocks():
  """int(ratio * total) heads / channels over all blocks together, reproducible by seed."""
  params = model('llama').params  # 2 blocks: 8 query heads, 4 key/value heads, 128 channels
  ratios = {'v_ratio': 0.5, 'o_ratio': 0.4, 'u_ratio': 0.1, 'd_ratio': 0.3}
  sel = select(params, HEADS, **ratios, seed=3)
  counts = {r: sum(s[r].size for s in sel.values()) for r in 'vodu'}
  assert counts == {'v': 2, 'o': 3, 'u': 12, 'd': 38}
  again = select(params, HEADS, **ratios, seed=3)
  other = select(params, HEADS, **ratios, seed=4)
  same = lambda a, b: all(np.array_equal(a[k][r], b[k][r]) for k in a for r in 'vodu')
  assert same(sel, again) and not same(sel, other)
  adapter = pj.s2ft(HEADS, **ratios, seed=3)
  _, state = adapter.init(jax.random.key(0), params)
  assert pj.num_params(state) == 32 * (2 * HEAD_DIM + 3 * HEAD_DIM + 12 + 38)


def test_a_file_of_another_draw_and_bad_arguments_are_clear_errors(tmp_path):
  params = model('bert').params
  ratios = {'v_ratio': 0.5, 'o_ratio': 0.5, 'u_ratio': 0.1, 'd_ratio': 0.1}
  adapter = pj.s2ft(HEADS, **ratios, seed=1)
  frozen, state = adapter.init(jax.random.key(0), params)
  pj.save_adapter(tmp_path, adapter, frozen, state)
  meta = json.loads((tmp_path / 'adapter_config.json').read_text())
  meta['method']['seed'] = 2  # another draw: its trained positions differ
  (tmp_path / 'adapter_config.json').write_text(json.dumps(meta))
  with pytest.raises(pj.AdapterFileError, match='other selected indices'):
    pj.load_adapter(tmp_path, params)
  with pytest.raises(ValueError, match=r'o_ratio must be in \[0, 1\]'):
    pj.s2ft(HEADS, o_ratio=1.5)
  with pytest.raises(ValueError, match='trains nothing'):
    pj.s2ft(HEADS, o_ratio=0.0, d_ratio=0.0)
  with pytest.raises(ValueError, match='num_heads must be a positive int'):
    pj.s2ft().init(jax.random.key(0), params)
  with pytest.raises(ValueError, match='not divisible by num_heads=5'):
    pj.s2ft(5).init(jax.random.key(0), params)
  with pytest.raises(ValueError, match=r'o_ratio=0.052 of 8 heads selects none'):
    pj.s2ft(HEADS).init(jax.random.key(0), params)
  with pytest.raises(ValueError, match="unknown s2ft layout 'gpt'"):
    pj.s2ft(HEADS, layout='gpt').init(jax.random.key(0), params)
  with pytest.raises(ValueError, match='layout has no attention'):
    pj.s2ft(HEADS, layout={'up': 'intermediate', 'down': 'output', 'block': 'encoder/layer_0'}
            ).init(jax.random.key(0), params)
  with pytest.raises(ValueError, match='attention needs all of q, k, v, o'):
    pj.s2ft(layout={'q': 'query', 'o': 'output'})
  with pytest.raises(ValueError, match=r"'o': expected distinct ids in \[0, 4\)"):
    co_permute(params, {'encoder/layer_0': {'o': [4]}}, HEADS)
