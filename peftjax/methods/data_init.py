"""Methods initialised from calibration data (`peftjax.core.calib.Calibration`).

- CorDA: LoRA factors from the SVD of the weight oriented by the input covariance.
- EVA: A from the top right-singular vectors of the layer inputs, B = 0, ranks moved across
  layers by explained variance.
- LoRA-GA: LoRA factors from the SVD of the averaged weight gradient.

All three run as LoRA (`LowRank(base, a, b, scale)`) and need `calib=Calibration(...)` in
`init` (the trainer builds one from `config.calibration`). CorDA and LoRA-GA re-base the frozen
tree on `W - scale * a0 @ b0`, held as a `calib.CalibratedResidual` that keeps `a0` and `b0`:
adapter files save them and `load_adapter` hands them back as `calib.Restored`, so a saved
adapter loads with the base params alone (no data). They cannot be unmerged: the merged
weight and the state do not determine `a0`, `b0`. EVA leaves W unchanged; on load its
per-layer ranks come from the saved state. Factorisations run in float32.

Weights are Flax kernels W (in, out), y = x @ W; the papers write W (out, in), y = W x.
"""
from __future__ import annotations

import math
from typing import Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

from peftjax.core import calib as C
from peftjax.core import paths as P
from peftjax.core.adapter import Adapter
from peftjax.core.leaves import materialize
from peftjax.methods.common import check_dropout, check_rank, select_matrices, target_list
from peftjax.methods.low_rank import low_rank, scaling

CORDA_MODES = ('kpm', 'ipm')
_HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- shared pieces
def _rebased(name, config, *, scale, factor, stats, factorise, rank_pattern, dropout) -> Adapter:
  """CorDA and LoRA-GA: per target `factorise(w, r, stat, scale) -> (a0, b0)` (float32), a
  frozen `CalibratedResidual(W - scale * a0 @ b0, a0, b0)` and a state starting at (a0, b0)."""

  def init(rng, params, *, calib=None):
    del rng
    flat, chosen = select_matrices(params, config['targets'], rank_pattern=rank_pattern)
    weights = {p: materialize(flat[p]) for p in chosen}
    ranks = {p: check_rank(name, p, P.first_match(p, rank_pattern, config['rank']),
                           weights[p].shape, factor=factor) for p in chosen}
    if isinstance(calib, C.Restored):
      pairs = ((p, _restored(name, calib, p)) for p in chosen)
    else:
      source = C.live(name, calib)
      pairs = ((p, factorise(weights[p].astype(jnp.float32), ranks[p], stat,
                             scale(p, ranks[p])))
               for p, stat in stats(source, chosen))
    state = {}
    for path, (a, b) in pairs:
      w, r = weights[path], ranks[path]
      a, b = jnp.asarray(a).astype(w.dtype), jnp.asarray(b).astype(w.dtype)
      if a.shape != (w.shape[0], r) or b.shape != (r, w.shape[1]):
        raise ValueError(f'{name}: factors of {path} are {a.shape} and {b.shape}; expected '
                         f'{(w.shape[0], r)} and {(r, w.shape[1])}')
      residual = w.astype(jnp.float32) - scale(path, r) * jnp.matmul(
          a.astype(jnp.float32), b.astype(jnp.float32), precision=_HI)
      flat[path] = C.CalibratedResidual(residual.astype(w.dtype), a, b)
      # Copies: the trainer donates the state's buffers, which the frozen tree must outlive.
      state[path] = {'a': jnp.copy(a), 'b': jnp.copy(b)}
    return P.unflatten(flat), state

  return low_rank(name, config, init, scale, dropout=dropout, invertible=False)


def _restored(name, calib: C.Restored, path):
  factors = calib.factors(path)
  if factors is None:
    raise ValueError(f'{name}: the adapter file holds no calibrated factors for {path} '
                     f'(frozen/{path}/a and /b)')
  return factors


# ------------------------------------------------------------------------------------- CorDA
def damped_covariance(cov, damping: float):
  """C + damping * mean(diag C) * I (damping * I where C is 0): always invertible."""
  cov = jnp.asarray(cov, jnp.float32)
  level = jnp.mean(jnp.diag(cov))
  level = jnp.where(level > 0, level, 1.0)
  return cov + damping * level * jnp.eye(cov.shape[0], dtype=cov.dtype)


def corda(targets, rank: int = 8, *, mode: str = 'kpm', alpha: float | None = None,
          damping: float = 0.01, rank_pattern: dict | None = None,
          dropout: float = 0.0) -> Adapter:
  """CorDA: LoRA factors from the SVD of W oriented by the input covariance.

  "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for Task-Aware
  Parameter-Efficient Fine-tuning" (Yang et al., NeurIPS 2024, arXiv:2406.05223).

  With the input covariance C = X^T X / n (damped: C~ = C + damping * mean(diag C) * I, as
  the reference implementation's first try), the paper's SVD of W C (W out x in) is, for a
  Flax kernel W (in, out), the SVD of (W^T C)^T = C~ W = U S V^T. Then W = C~^-1 U S V^T,
  a sum of components (C~^-1 u_i) s_i v_i^T ordered by covariance-weighted energy s_i.
  The adapter takes r of them: A = C~^-1 U_r S_r^1/2, B = S_r^1/2 V_r^T (over sqrt(scale)),
  over the frozen residual W - scale * A @ B, so the weight at init is W. HF PEFT's
  `corda.py` retries with doubled damping until its inverse reproduces I; here the relative
  damping keeps C~ positive definite in one try.

  Args:
    targets: a regex or a list of regexes searched in slash paths, each matching a 2-D
      kernel that the calibration model feeds.
    rank: the rank r, a positive int <= min(in, out).
    mode: 'kpm' (the default, knowledge-preserved) trains the r smallest components,
      'ipm' (instruction-previewed) the r largest.
    alpha: scale = alpha / r; None (the default) gives scale 1.
    damping: the relative damping, > 0; raise it for a nearly singular covariance.
    rank_pattern: `{regex: rank}` overrides of `rank`, first match wins.
    dropout: dropout on the input of the adapter path (training only), in [0, 1).

  Returns:
    An `Adapter` whose `init` needs `calib=Calibration(...)` (its `covariance` at every
      target). Its frozen tree holds `CalibratedResidual(W - scale * A0 @ B0, A0, B0)` at each
      target (adapter files keep A0 and B0, so `load_adapter` needs no data) and its state is
      `{path: {'a': (in, r), 'b': (r, out)}}`, starting at (A0, B0); `apply` returns `LowRank`
      leaves. Not invertible: it has no `unmerge`.

  Raises:
    ValueError: an unknown `mode`, `damping` <= 0 or `dropout` outside [0, 1); from `init`,
      a `calib` that is not a `Calibration`, a rank that is not a positive int or exceeds
      min(in, out), or a target the calibration batches do not reach.
    PatternError: from `init`, a target or `rank_pattern` regex that matches no 2-D param.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, peftjax as pj
    >>> model = nn.Dense(4)
    >>> x = jax.random.normal(jax.random.key(1), (16, 8))  # one calibration batch
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> calib = pj.Calibration(lambda p, batch: model.apply({'params': p}, batch), params, [x])
    >>> adapter = pj.corda('kernel', rank=2, mode='ipm')
    >>> frozen, state = adapter.init(jax.random.key(0), params, calib=calib)
    >>> state['kernel']['a'].shape, state['kernel']['b'].shape
    ((8, 2), (2, 4))
    >>> merged = pj.merge(adapter, frozen, state)  # W at init
    >>> bool(jnp.allclose(merged['kernel'], params['kernel'], atol=1e-5))
    True
  """
  if mode not in CORDA_MODES:
    raise ValueError(f'corda mode must be one of {CORDA_MODES}, got {mode!r}')
  if not damping > 0:
    raise ValueError(f'corda damping must be > 0, got {damping}')
  check_dropout('corda', dropout)
  config = dict(method='corda', targets=target_list(targets), rank=rank, mode=mode, alpha=alpha,
                damping=damping, rank_pattern=dict(rank_pattern or {}), dropout=dropout)

  def scale(path, r):
    del path
    return scaling(alpha, r)

  def factorise(w, r, cov, scale):
    chex.assert_shape(cov, (w.shape[0], w.shape[0]), custom_message='corda covariance')
    ct = damped_covariance(cov, damping)
    u, s, vt = jnp.linalg.svd(jnp.matmul(ct, w, precision=_HI), full_matrices=False)
    k = s.shape[0]
    sel = slice(0, r) if mode == 'ipm' else slice(k - r, k)
    root = jnp.sqrt(s[sel] / scale)
    return jnp.linalg.solve(ct, u[:, sel]) * root, root[:, None] * vt[sel]

  return _rebased('corda', config, scale=scale, factor=1,
                  stats=lambda calib, paths: calib.iter_covariances(paths),
                  factorise=factorise, rank_pattern=rank_pattern, dropout=dropout)


# --------------------------------------------------------------------------------------- EVA
def explained_variance(x, k: int):
  """Top-k right-singular vectors (in, k), singular values and explained-variance ratios
  s_i^2 / sum_j s_j^2 of the centred rows `x` (n, in)."""
  x = jnp.asarray(x, jnp.float32)
  _, s, vt = jnp.linalg.svd(x - jnp.mean(x, axis=0), full_matrices=False)
  total = jnp.sum(s * s)
  ratio = jnp.where(total > 0, s * s / jnp.where(total > 0, total, 1.0), 0.0)
  return vt[:k].T, s[:k], np.asarray(ratio[:k], np.float64)


def eva_ranks(ratios: Mapping[str, np.ndarray], budget: int) -> dict[str, int]:
  """EVA's rank allocation: the `budget` largest explained-variance ratios among all targets'
  offered components, counted per target (ties: earlier target, then earlier component)."""
  ranked = sorted((-float(v), t, i, path) for t, (path, vals) in enumerate(ratios.items())
                  for i, v in enumerate(vals))
  ranks = dict.fromkeys(ratios, 0)
  for *_, path in ranked[:budget]:
    ranks[path] += 1
  return ranks


def eva(targets, rank: int = 8, *, rho: float = 2.0, alpha: float = 16.0,
        whiten: bool = False, adjust_scaling_factors: bool = False,
        max_rows: int | None = None, dropout: float = 0.0) -> Adapter:
  """EVA: A from the top right-singular vectors of each target's inputs, ranks by variance.

  "One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation"
  (Paischer et al., ICML 2025, arXiv:2410.07170).

  Per target, the SVD of a sample of its centred input rows (`calib.activations`; the
  stacked sample stands in for the paper's incremental SVD over minibatches) offers its top
  round(rho * rank) right-singular vectors with their explained-variance ratios. The budget
  rank * (number of targets) goes to the largest ratios over all targets. A (in, r_l) = the
  layer's top r_l vectors, B = 0: the weight at init is W. Layers allotted rank 0 get no
  adapter.

  Args:
    targets: a regex or a list of regexes searched in slash paths, each matching a 2-D
      kernel that the calibration model feeds.
    rank: the mean rank, a positive int: the budget is rank * (number of targets).
    rho: >= 1; a layer gets at most round(rho * rank) (and min(in, out)); rho = 1 gives
      every layer `rank`.
    alpha: scale = alpha / r_l, or alpha / rank for all with `adjust_scaling_factors`.
    whiten: divide A's columns by the square roots of their singular values.
    adjust_scaling_factors: see `alpha`; False (the default) as in the authors' code
      (ml-jku/EVA); HF PEFT's `EvaConfig` defaults to True.
    max_rows: the input rows sampled per target; None: the `Calibration`'s `max_rows`.
    dropout: dropout on the input of the adapter path (training only), in [0, 1).

  Returns:
    An `Adapter` whose `init` needs `calib=Calibration(...)` (its `activations` at every
      target); the frozen tree is the params, unchanged, and the state is
      `{path: {'a': (in, r_l), 'b': (r_l, out)}}` for the targets with r_l > 0; `apply` returns
      `LowRank` leaves. `describe` lists every target with its rank (0 included). Invertible.

  Raises:
    ValueError: a rank that is not a positive int, `rho` < 1 or `dropout` outside [0, 1);
      from `init`, a `calib` that is not a `Calibration`, or a target the calibration
      batches do not reach.
    PatternError: from `init`, a target regex that matches no 2-D param.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, peftjax as pj
    >>> model = nn.Sequential([nn.Dense(8), nn.Dense(4)])
    >>> x = jax.random.normal(jax.random.key(1), (32, 8))  # one calibration batch
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> calib = pj.Calibration(lambda p, batch: model.apply({'params': p}, batch), params, [x])
    >>> adapter = pj.eva('kernel', rank=2)
    >>> frozen, state = adapter.init(jax.random.key(0), params, calib=calib)
    >>> sum(ab['a'].shape[1] for ab in state.values())  # the budget: 2 ranks x 2 targets
    4
    >>> all(not ab['b'].any() for ab in state.values())  # B = 0
    True
  """
  check_rank('eva', None, rank)
  if not rho >= 1.0:
    raise ValueError(f'eva rho must be >= 1, got {rho}')
  check_dropout('eva', dropout)
  config = dict(method='eva', targets=target_list(targets), rank=rank, rho=rho, alpha=alpha,
                whiten=whiten, adjust_scaling_factors=adjust_scaling_factors,
                max_rows=max_rows, dropout=dropout)

  def scale(path, r):
    del path
    return scaling(alpha, rank if adjust_scaling_factors else r)

  def init(rng, params, *, calib=None):
    del rng
    flat, chosen = select_matrices(params, config['targets'])
    if isinstance(calib, C.Restored):
      ranks = {p: 0 if calib.state_leaf(p, 'a') is None else
               int(np.shape(calib.state_leaf(p, 'a'))[1]) for p in chosen}
      vectors = {p: jnp.zeros((flat[p].shape[0], r)) for p, r in ranks.items()}
    else:
      offered = max(1, round(rho * rank))
      vectors, ratios = {}, {}
      for path, x in C.live('eva', calib).iter_activations(chosen, max_rows):
        v, s, ratios[path] = explained_variance(x, min(offered, *flat[path].shape))
        vectors[path] = v / jnp.sqrt(jnp.maximum(s, 1e-12)) if whiten else v
      ranks = eva_ranks(ratios, rank * len(chosen))
    state = {}
    for path, r in ranks.items():
      if r:
        w = flat[path]
        state[path] = {'a': vectors[path][:, :r].astype(w.dtype),
                       'b': jnp.zeros((r, w.shape[1]), w.dtype)}
    return params, state

  return low_rank('eva', config, init, scale, dropout=dropout, every_target=True)


# ----------------------------------------------------------------------------------- LoRA-GA
LORA_GA_DIRECTIONS = ('ArB2r', 'A2rBr')


def lora_ga(targets, rank: int = 8, alpha: float = 16.0, *, direction: str = 'ArB2r',
            stable_gamma: float | None = 16.0, rslora: bool = False,
            rank_pattern: dict | None = None, dropout: float = 0.0) -> Adapter:
  """LoRA-GA: LoRA factors from the SVD of the averaged weight gradient.

  "LoRA-GA: Low-Rank Adaptation with Gradient Approximation" (Wang et al., NeurIPS 2024,
  arXiv:2407.05000).

  G = dL/dW averaged over the calibration batches (`calib.gradient`). In the paper's torch
  layout (G out x in = U S V^T, B out x r, A r x in), direction 'ArB2r' takes
  A_init = V[:, :r]^T and B_init = U[:, r:2r]; 'A2rBr' takes A_init = V[:, r:2r]^T and
  B_init = U[:, :r]. The first step is the same either way (it spans the top 2r singular
  directions of G); later steps differ. In the Flax layout the gradient is G^T (in, out) =
  V S U^T, so with its SVD u, vt: 'ArB2r' is A (in, r) = u[:, :r], B (r, out) = vt[r:2r].
  The frozen base offset W - scale * A @ B keeps the weight at init equal to W.

  Args:
    targets: a regex or a list of regexes searched in slash paths, each matching a 2-D
      kernel that the calibration model feeds.
    rank: the rank r, a positive int with 2 * r <= min(in, out).
    alpha: scale = alpha / r (alpha / sqrt(r) with `rslora`).
    direction: 'ArB2r' (the default, the official one) or 'A2rBr'.
    stable_gamma: A and B are multiplied by out^(1/4) / sqrt(stable_gamma) (the official
      code's "stable" scale), > 0; None keeps them orthonormal.
    rslora: scale alpha / sqrt(r) instead of alpha / r.
    rank_pattern: `{regex: rank}` overrides of `rank`, first match wins.
    dropout: dropout on the input of the adapter path (training only), in [0, 1).

  Returns:
    An `Adapter` whose `init` needs `calib=Calibration(..., loss_fn=...)` (its `gradient` at
      every target). Its frozen tree holds `CalibratedResidual(W - scale * A0 @ B0, A0, B0)` at
      each target (adapter files keep A0 and B0, so `load_adapter` needs no data) and its state
      is `{path: {'a': (in, r), 'b': (r, out)}}`, starting at (A0, B0); `apply` returns
      `LowRank` leaves. Not invertible: it has no `unmerge`.

  Raises:
    ValueError: `stable_gamma` <= 0, an unknown `direction` or `dropout` outside [0, 1);
      from `init`, a `calib` that is not a `Calibration` or has no `loss_fn`, or a rank that
      is not a positive int or exceeds min(in, out) / 2.
    PatternError: from `init`, a target or `rank_pattern` regex that matches no 2-D param.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, peftjax as pj
    >>> model = nn.Dense(4)
    >>> x = jax.random.normal(jax.random.key(1), (16, 8))  # one calibration batch
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> run = lambda p, batch: model.apply({'params': p}, batch)
    >>> loss = lambda p, batch: jnp.mean(run(p, batch) ** 2)
    >>> calib = pj.Calibration(run, params, [x], loss_fn=loss)
    >>> adapter = pj.lora_ga('kernel', rank=2)
    >>> frozen, state = adapter.init(jax.random.key(0), params, calib=calib)
    >>> state['kernel']['a'].shape, state['kernel']['b'].shape
    ((8, 2), (2, 4))
  """
  if stable_gamma is not None and not stable_gamma > 0:
    raise ValueError(f'lora_ga stable_gamma must be > 0 or None, got {stable_gamma}')
  if direction not in LORA_GA_DIRECTIONS:
    raise ValueError(f'lora_ga direction must be one of {LORA_GA_DIRECTIONS}, got {direction!r}')
  check_dropout('lora_ga', dropout)
  config = dict(method='lora_ga', targets=target_list(targets), rank=rank, alpha=alpha,
                direction=direction, stable_gamma=stable_gamma, rslora=rslora,
                rank_pattern=dict(rank_pattern or {}), dropout=dropout)

  def scale(path, r):
    del path
    return scaling(alpha, r, rslora)

  def factorise(w, r, grad, scale):
    del scale
    chex.assert_shape(grad, w.shape, custom_message='lora_ga gradient')
    u, _, vt = jnp.linalg.svd(jnp.asarray(grad, jnp.float32), full_matrices=False)
    if direction == 'ArB2r':
      a, b = u[:, :r], vt[r:2 * r]
    else:
      a, b = u[:, r:2 * r], vt[:r]
    if stable_gamma is not None:
      c = w.shape[1] ** 0.25 / math.sqrt(stable_gamma)
      a, b = a * c, b * c
    return a, b

  return _rebased('lora_ga', config, scale=scale, factor=2,
                  stats=lambda calib, paths: calib.iter_gradients(paths),
                  factorise=factorise, rank_pattern=rank_pattern, dropout=dropout)
