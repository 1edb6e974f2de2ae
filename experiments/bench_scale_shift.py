"""SSF's train step with its scales as `Scaled` leaves vs formed densely, and the merged model.

  python -m experiments.bench_scale_shift [--steps 5] [--rounds 3] [--batch 32] [--seq_len 64]

On a MiniLM-L6-shaped BERT (random weights; 6 blocks, width 384, FFN 1536), SSF on every
encoder kernel and LayerNorm. `structured`: the adapted tree holds `Scaled(W, γ)` leaves, which
the layers compute as `(x @ W) * γ`; `dense`: the same tree materialised inside the loss
(`W * γ` formed, so the backward pass computes a full-size gradient of it per kernel). Both
are jitted gradient + Adam steps; rounds interleave them. The forward rows compare the merged
SSF tree (a plain BERT tree) with the base weights, for the claim that merging costs nothing
at inference, and show the unmerged tree (`Scaled` leaves: one more product per kernel) for
what merging saves. Reports the median step time of each over rounds, whether the merged
tree compiles to the base weights' very program, and the merged / base forward ratio from
`--pairs` back-to-back calls of the two (the median of each pair's ratio: robust to a load
that changes between rounds).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peftjax as pj
from peftjax.models.bert import Bert, BertConfig

MINILM = BertConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                    intermediate_size=1536)
TARGETS = ('encoder/.*/kernel', 'norm/scale$')


def timed(fn, args, steps: int) -> float:
  """Median seconds of `steps` calls of `fn(*args)`, after one warm-up (the compile)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def paired_ratio(fn, a, b, pairs: int) -> float:
  """Median over `pairs` of time(fn(b)) / time(fn(a)), the two calls back to back."""
  jax.block_until_ready((fn(a), fn(b)))
  ratios = []
  for i in range(pairs):
    seconds = {}
    for name, arg in ((('a', a), ('b', b)) if i % 2 else (('b', b), ('a', a))):
      start = time.perf_counter()
      jax.block_until_ready(fn(arg))
      seconds[name] = time.perf_counter() - start
    ratios.append(seconds['b'] / seconds['a'])
  return float(np.median(ratios))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--seq_len', type=int, default=64)
  parser.add_argument('--pairs', type=int, default=20)
  args = parser.parse_args()

  module = Bert(MINILM)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, MINILM.vocab_size, (args.batch, args.seq_len)), jnp.int32)
  mask = jnp.ones_like(ids)
  params = jax.jit(module.init)(jax.random.key(0), ids[:1], mask[:1])['params']
  adapter = pj.ssf(TARGETS, init='normal')
  frozen, state = adapter.init(jax.random.key(1), params)
  tx = optax.adam(1e-3)

  def step_fn(transform):
    def loss(state):
      hidden = pj.apply(module, transform(adapter.apply(frozen, state)), ids, mask)
      return jnp.mean(hidden[:, 0] ** 2)

    @jax.jit
    def step(state, opt):
      updates, opt = tx.update(jax.grad(loss)(state), opt)
      return optax.apply_updates(state, updates), opt
    return step

  forward = jax.jit(lambda p: pj.apply(module, p, ids, mask))
  merged = pj.merge(adapter, frozen, state)
  runs = {'train step, structured (Scaled leaves)': (step_fn(lambda p: p), (state, tx.init(state))),
          'train step, dense (W * γ in the loss)': (step_fn(pj.materialize),
                                                    (state, tx.init(state))),
          'forward, base weights': (forward, (params,)),
          'forward, merged SSF weights': (forward, (merged,)),
          'forward, unmerged SSF (Scaled leaves)': (jax.jit(
              lambda s: pj.apply(module, adapter.apply(frozen, s), ids, mask)), (state,))}
  times = {name: [] for name in runs}
  for _ in range(args.rounds):
    for name, (fn, fn_args) in runs.items():
      times[name].append(timed(fn, fn_args, args.steps))
  print(f'SSF on {len(state)} targets ({pj.num_params(state):,} params), batch '
        f'{args.batch} x {args.seq_len}, {jax.device_count()} device(s), median of '
        f'{args.rounds} rounds x {args.steps} steps')
  medians = {name: float(np.median(t)) for name, t in times.items()}
  for name, t in medians.items():
    print(f'{name:<42} {1000 * t:8.1f} ms')
  dense, structured = (medians['train step, dense (W * γ in the loss)'],
                       medians['train step, structured (Scaled leaves)'])
  base = medians['forward, base weights']
  print(f'structured / dense step time: {structured / dense:.2f}; forward / base forward: '
        f'merged {medians["forward, merged SSF weights"] / base:.3f}, unmerged '
        f'{medians["forward, unmerged SSF (Scaled leaves)"] / base:.3f}')
  same = forward.lower(merged).as_text() == forward.lower(params).as_text()
  print(f'merged SSF forward: the base weights\' compiled program: {"yes" if same else "no"}; '
        f'time / base, median of {args.pairs} back-to-back pairs: '
        f'{paired_ratio(forward, params, merged, args.pairs):.3f}')


if __name__ == '__main__':
  main()
