"""Where a LoRA step's time goes, one MiniLM linear layer at a time.

  python -m experiments.bench_linear [--batch 32] [--seq_len 64] [--rank 8] [--reps 30]

For each of MiniLM-L6's three linear shapes (attention 384->384, FFN in 384->1536, FFN out
1536->384) it times forward + backward of one layer on a (batch, seq_len, in) activation:

- `frozen`: dX only (what every method pays to backpropagate through a frozen layer),
- `full`: dX and dW (full fine-tuning),
- `lora`: peftjax's `dense` on a `LowRank` kernel (dX, dA, dB), leading axes folded to 2-D,
- `lora, autodiff backward`: the same product, 2-D, differentiated by JAX instead of `dense`'s
  hand-written backward pass,
- `lora, autodiff, 3-D`: ... and left batched over (batch, seq) instead of folded to 2-D,
- `lora + dropout`: `dense` with adapter dropout 0.1 from peftjax's hash mask,
- `lora + threefry dropout`: autodiff LoRA with the mask from `jax.random.bernoulli`.

Times are medians over `--reps` calls of one jitted function; the ratio column divides by
`full` of the same shape, measured in the same run.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.core.leaves import LowRank, dense

SHAPES = {'attention 384->384': (384, 384), 'FFN in 384->1536': (384, 1536),
          'FFN out 1536->384': (1536, 384)}
SCALE, RATE = 2.0, 0.1


def median_ms(fn, *args, reps: int) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    tic = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - tic)
  return float(np.median(times) * 1e3)


def variants(g, rng):
  """name -> function(x, w, a, b) returning the gradients that its method needs."""

  def batched(x, w, a, b):  # ... and without folding (batch, seq) into one axis
    return jnp.einsum('bsi,io->bso', x, w) + jnp.einsum(
        'bsr,ro->bso', jnp.einsum('bsi,ir->bsr', x, a), b) * SCALE

  def threefry(x, w, a, b):
    keep = jax.random.bernoulli(rng, 1.0 - RATE, x.shape)
    h = jnp.where(keep, x / (1.0 - RATE), 0.0)
    return dense(x, w) + (dense(dense(h, a), b)) * SCALE

  def grads(f, argnums):  # Unused cotangents are dead code that jit removes.
    return lambda *z: [jax.vjp(f, *z)[1](g)[i] for i in argnums]

  return {
      'frozen': grads(lambda x, w, a, b: dense(x, w), (0,)),
      'full': grads(lambda x, w, a, b: dense(x, w), (0, 1)),
      'lora': grads(lambda x, w, a, b: dense(x, LowRank(w, a, b, SCALE)), (0, 2, 3)),
      'lora, autodiff backward': grads(lambda x, w, a, b: dense(x, w) + dense(dense(x, a), b)
                                       * SCALE, (0, 2, 3)),
      'lora, autodiff, 3-D': grads(batched, (0, 2, 3)),
      'lora + dropout': grads(lambda x, w, a, b: dense(x, LowRank(w, a, b, SCALE, RATE), rng),
                              (0, 2, 3)),
      'lora + threefry dropout': grads(threefry, (0, 2, 3)),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m experiments.bench_linear',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--seq_len', type=int, default=64)
  parser.add_argument('--rank', type=int, default=8)
  parser.add_argument('--reps', type=int, default=30)
  args = parser.parse_args(argv)
  rows = []
  for label, (d_in, d_out) in SHAPES.items():
    k = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(k[0], (args.batch, args.seq_len, d_in))
    w = jax.random.normal(k[1], (d_in, d_out)) * d_in**-0.5
    a = jax.random.normal(k[2], (d_in, args.rank)) * d_in**-0.5
    b = jax.random.normal(k[3], (args.rank, d_out)) * args.rank**-0.5
    g = jax.random.normal(k[4], (args.batch, args.seq_len, d_out))
    times = {name: median_ms(f, x, w, a, b, reps=args.reps)
             for name, f in variants(g, k[5]).items()}
    rows += [(label, name, ms, ms / times['full']) for name, ms in times.items()]
  print(f'## One linear layer, forward + backward, batch {args.batch} x {args.seq_len}, '
        f'rank {args.rank}, {jax.default_backend()} ({jax.device_count()} device(s))\n')
  print('| layer | variant | ms (median) | ÷ full |\n|---|---|---|---|')
  for label, name, ms, ratio in rows:
    print(f'| {label} | {name} | {ms:.2f} | {ratio:.2f} |')


if __name__ == '__main__':
  main()
