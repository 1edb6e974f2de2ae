"""Regularized mask tuning (R-AMT): "Regularized Mask Tuning: Uncovering Hidden Knowledge in
Pre-trained Vision-Language Models" (Zheng, Wu, Feng, Zhu, Liu, Zhao, Zha, Chen & Shen,
ICCV 2023, arXiv:2307.15049).

Each targeted weight W is frozen and runs as W * 1[s > threshold]: a binary mask of real
scores s, the only trainable state. The forward pass uses the exact binary mask; the backward
pass is the straight-through estimator (dL/ds = dL/dm = dL/dW_eff * W). Scores start at
`scale` (> threshold), so the initial mask is all ones and the model is unchanged.

Gradient dropout ("gradient dropout regularity", as the official trainer computes it): with
g the gradient of the training loss and h that of the divergence of the masked model's
predictions from the unmasked model's (temperature T, the teacher's logits fused with the
student's by `alpha`), each entry of g is kept if P > U, U ~ U(0, 1), where

  P = (1 + sign(g) * (g + h) / (|g| + |h| + 1e-8)) / 2,

and scaled by 1 - lambda otherwise. Where g and h agree in sign P is 1 (kept); where they
disagree P = |g| / (|g| + |h|), so an update that the divergence opposes is dropped with
probability |h| / (|g| + |h|). The train step computes h and calls the method's `Guide`
(`peftjax.core.adapter.Guide`); the key derives from the run's seed and step. That costs a
forward pass of the unmasked model and a second forward and backward pass per step (about
twice a step without it; gradient_dropout_lambda=0 switches it off). An optional
`reg` adds reg * sum over targets of ||s||_2 to the loss (the official `MASK_LOSS`).

Adapter files hold the binary masks bit-packed (`peftjax.io.bits`, one bit per entry), not the
scores: loading gives scores `scale` where the mask is on and `2 * threshold - scale` where
it is off (as far below the threshold as `scale` is above).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.core import paths as P
from peftjax.core.adapter import Adapter, Codec, Guide
from peftjax.core.leaves import materialize
from peftjax.io import bits
from peftjax.methods.common import target_list

EPS = 1e-8


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def masked_weight(w, scores, threshold: float):
  """`w` where `scores > threshold`, else 0; straight-through gradient for the scores."""
  return jnp.where(scores > threshold, w, jnp.zeros_like(w))


def _masked_fwd(w, scores, threshold):
  return masked_weight(w, scores, threshold), (w, scores)


def _masked_bwd(threshold, residuals, g):
  w, scores = residuals
  on = scores > threshold
  return jnp.where(on, g, jnp.zeros_like(g)), (g * w).astype(scores.dtype)


masked_weight.defvjp(_masked_fwd, _masked_bwd)


def keep_probability(g, h, eps: float = EPS):
  """R-AMT's P: the probability that a gradient entry of the loss, `g`, survives given the
  divergence's gradient `h`."""
  return (jnp.sign(g) * (g + h) / (jnp.abs(g) + jnp.abs(h) + eps) + 1.0) / 2.0


def gradient_dropout(key, grads, guide_grads, lam: float = 1.0):
  """`grads` with each entry kept where P > U and scaled by 1 - lam elsewhere (every leaf
  draws its own uniforms from `key`)."""
  leaves, treedef = jax.tree.flatten(grads)
  keys = jax.random.split(key, max(len(leaves), 1))
  out = []
  for k, g, h in zip(keys, leaves, jax.tree.leaves(guide_grads)):
    u = jax.random.uniform(k, g.shape, jnp.float32)
    keep = keep_probability(g.astype(jnp.float32), h.astype(jnp.float32)) > u
    out.append(g * jnp.where(keep, 1.0, 1.0 - lam).astype(g.dtype))
  return jax.tree.unflatten(treedef, out)


def distillation(logits, reference, weights, temperature: float = 1.0, alpha: float = 1.0):
  """The official KL term: soft targets softmax((alpha * ref + (1 - alpha) * logits) / T),
  cross-entropy of the student at temperature T, times T^2, averaged over weighted rows."""
  logits = logits.astype(jnp.float32)
  teacher = alpha * reference.astype(jnp.float32) + (1.0 - alpha) * logits
  target = jax.nn.softmax(teacher / temperature, axis=-1)
  rows = -jnp.sum(target * jax.nn.log_softmax(logits / temperature, axis=-1), -1)
  rows = rows * temperature ** 2
  return jnp.sum(rows * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def mask_tuning(targets, *, scale: float = 1e-2, threshold: float = 5e-3,
                gradient_dropout_lambda: float = 1.0, temperature: float = 1.0,
                alpha: float = 1.0, reg: float = 0.0) -> Adapter:
  """R-AMT's binary masks on every parameter (of any rank) that a regex of `targets` finds.

  Args:
    targets: regexes searched in slash paths, e.g. `attention/(query|key|value)/kernel`.
    scale, threshold: initial score (the official MASK.SCALE, 1e-2) and the binarisation
      threshold (MASK.THRESHOLD, 5e-3); scale > threshold, so every mask starts on.
    gradient_dropout_lambda: lambda of gradient dropout (GDR_LAMBDA): 1 drops an entry to
      0, less keeps 1 - lambda of it; 0 switches gradient dropout off (no guide).
    temperature, alpha: T (GDR_T) and the teacher fusion (FUSE_ALPHA) of the divergence.
    reg: weight of the sum of the scores' L2 norms added to the loss (0: none).

  References:
    Zheng et al., "Regularized Mask Tuning: Uncovering Hidden Knowledge in Pre-trained
    Vision-Language Models" (R-AMT), ICCV 2023, arXiv:2307.15049.
  """
  if not scale > threshold:
    raise ValueError(f'mask_tuning needs scale > threshold (masks start on), got scale '
                     f'{scale} and threshold {threshold}')
  if not 0.0 <= gradient_dropout_lambda <= 1.0:
    raise ValueError(f'mask_tuning gradient_dropout_lambda must be in [0, 1], got '
                     f'{gradient_dropout_lambda}')
  if not temperature > 0:
    raise ValueError(f'mask_tuning temperature must be > 0, got {temperature}')
  if reg < 0:
    raise ValueError(f'mask_tuning reg must be >= 0, got {reg}')
  config = dict(method='mask_tuning', targets=target_list(targets), scale=scale,
                threshold=threshold, gradient_dropout_lambda=gradient_dropout_lambda,
                temperature=temperature, alpha=alpha, reg=reg)
  off = 2.0 * threshold - scale

  def init(rng, params, *, calib=None):
    del rng, calib
    flat = P.flatten(params)
    chosen = P.select(flat, config['targets'])
    dtypes = {p: materialize(flat[p]).dtype for p in chosen}
    bad = [p for p, d in dtypes.items() if not jnp.issubdtype(d, jnp.floating)]
    if bad:
      raise ValueError(f'mask_tuning targets floating-point weights; {bad[0]} is {dtypes[bad[0]]}')
    return params, {p: jnp.full(flat[p].shape, scale, dtypes[p]) for p in chosen}

  def apply(frozen, state):
    flat = P.flatten(frozen)
    for path, scores in state.items():
      w = materialize(flat[path])
      if scores.shape != w.shape:
        raise ValueError(f'mask_tuning scores of {path} are {scores.shape}; the weight is '
                         f'{w.shape}')
      flat[path] = masked_weight(w, scores, threshold)
    return P.unflatten(flat)

  def describe(frozen, state):
    flat = P.flatten(frozen)
    return {p: {'shape': list(flat[p].shape), 'trainable': int(s.size),
                'masked': int(jnp.sum(s <= threshold))} for p, s in state.items()}

  def encode(state):
    return {p: bits.pack(np.asarray(s > threshold), 1) for p, s in state.items()}

  def decode(stored, template):
    out = {}
    for p, t in template.items():
      on = bits.unpack(stored[p], 1, t.size).reshape(t.shape)
      out[p] = jnp.asarray(np.where(on, scale, off), t.dtype)
    return out

  def combine(key, grads, guide_grads):
    return gradient_dropout(key, grads, guide_grads, gradient_dropout_lambda)

  guide = None
  if gradient_dropout_lambda > 0:
    guide = Guide(reference=lambda frozen, state: frozen,
                  divergence=functools.partial(distillation, temperature=temperature,
                                               alpha=alpha),
                  combine=combine)
  loss = None
  if reg > 0:
    loss = lambda state: reg * sum(jnp.linalg.norm(s.astype(jnp.float32).ravel())
                                   for s in state.values())
  return Adapter(init=init, apply=apply, config=config, loss=loss, describe=describe,
                 codec=Codec(encode, decode), guide=guide)
