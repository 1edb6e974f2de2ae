"""Methods initialised from a factorisation of the pretrained weight W (in, out).

Each re-bases the frozen tree on a residual, so the adapted weight at init equals W:
- PiSSA, MiLoRA / SoMA: LoRA factors from the largest / smallest singular triplets.
- SORSA: trainable U_p, S_p, V_p^T with an orthonormality regulariser.
- SVFit: only the top singular values train; LoLDU: only an LDU diagonal and a scale train.
- SoKA: trainable Kronecker factors from the Kronecker-product SVD, adaptive rank.

Where fixed factors are needed (SVFit, LoLDU) they live in the frozen tree at the target's
path as `LowRank(residual, u, v, 0.0)`: a structured leaf with its delta switched off. The
frozen tree thus stays an ordinary pytree (device_put, jit and checkpoints see plain arrays),
runs (as the residual) and materialises like PiSSA's residual, and still has one leaf of the
weight's shape at each target path; `apply` reads `u` and `v` from it. Such methods cannot be
unmerged: the merged weight and the state do not determine the fixed factors.

All factorisations are deterministic functions of W (randomised SVDs draw from `seed` in the
config, not from `init`'s rng), so `load_adapter`, which re-runs `init` on the base params,
rebuilds the same frozen tree.
"""
from __future__ import annotations

import zlib

import chex
import jax
import jax.numpy as jnp
import optax

from peftjax.core import linalg
from peftjax.core import paths as P
from peftjax.core.adapter import Adapter, is_entry
from peftjax.core.leaves import LowRank, materialize
from peftjax.methods.common import check_dropout, check_rank, select_matrices, target_list
from peftjax.methods.low_rank import low_rank, scaling

KRON_RANKS = ('auto', 'energy', 'elbow')


# ----------------------------------------------------------------------------- shared pieces
def _key(seed: int, path: str):
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _top(w, r: int, niter, seed: int, path: str):
  if niter is None:
    return linalg.svd_top(w, r)
  return linalg.randomized_svd(_key(seed, path), w, r, niter=niter)


def _rebuild(frozen, state, leaf):
  """`frozen` with `leaf(path, frozen_leaf, state[path])` at every adapted path."""
  flat = P.flatten(frozen)
  for path, st in state.items():
    flat[path] = leaf(path, flat[path], st)
  return P.unflatten(flat)


def _fixed(name: str, path: str, f) -> LowRank:
  if not isinstance(f, LowRank):
    raise ValueError(f'{name}: the frozen leaf at {path} holds no fixed factors; use the '
                     f'frozen tree returned by {name}.init')
  return f


def _info(w, trainable, **extra):
  return {'shape': list(w.shape), 'trainable': int(trainable), **extra}


# ----------------------------------------------------------------------- PiSSA, MiLoRA, SoMA
def _principal(name, targets, rank, alpha, *, minor, niter=None, seed=0, rank_pattern=None,
               dropout=0.0) -> Adapter:
  """LoRA factors A = U_r S_r^1/2, B = S_r^1/2 V_r^T (over sqrt(scale)) on a frozen residual."""
  check_dropout(name, dropout)
  if niter is not None and (not isinstance(niter, int) or niter < 0):
    raise ValueError(f'{name} niter must be None (exact SVD) or an int >= 0, got {niter!r}')
  config = dict(method=name, targets=target_list(targets), rank=rank, alpha=alpha,
                rank_pattern=dict(rank_pattern or {}), dropout=dropout)
  if not minor:
    config |= dict(niter=niter, seed=seed)

  def scale(path, r):
    del path
    return scaling(alpha, r)

  def init(rng, params, *, calib=None):
    del rng, calib
    flat, chosen = select_matrices(params, config['targets'], rank_pattern=rank_pattern)
    state = {}
    for path in chosen:
      w = materialize(flat[path])
      r = check_rank(name, path, P.first_match(path, rank_pattern, rank), w.shape)
      u, s, vt = linalg.svd_bottom(w, r) if minor else _top(w, r, niter, seed, path)
      root = jnp.sqrt(s / scale(path, r))
      a, b = u * root, root[:, None] * vt
      flat[path] = (w - scale(path, r) * (a @ b)).astype(w.dtype)
      state[path] = {'a': a.astype(w.dtype), 'b': b.astype(w.dtype)}
    return P.unflatten(flat), state

  return low_rank(name, config, init, scale, dropout=dropout)


def pissa(targets, rank: int = 8, alpha: float | None = None, *, niter: int | None = None,
          seed: int = 0, rank_pattern: dict | None = None, dropout: float = 0.0) -> Adapter:
  """PiSSA: LoRA factors from the top-r singular triplets of W, over a frozen residual.

  "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models"
  (Meng, Wang & Zhang, NeurIPS 2024, arXiv:2404.02948). With the top-r SVD U_r S_r V_r^T of
  W (in, out), A (in, r) = U_r S_r^1/2 and B (r, out) = S_r^1/2 V_r^T, both divided by
  sqrt(scale), train over the frozen residual W - U_r S_r V_r^T: the weight at init is W,
  whatever alpha (which only scales the factors' updates).

  Args:
    targets: a regex or a list of regexes searched in slash paths, e.g.
      `attention/(query|value)/kernel`; each must match a 2-D parameter.
    rank: the rank r, a positive int <= min(in, out).
    alpha: scale = alpha / r; None (the default) gives scale 1.
    niter: None (the default) for the exact SVD; an int >= 0 for the paper's fast variant, a
      randomised SVD (Halko et al.) with `niter` subspace iterations.
    seed: the randomised SVD's sketch draws from `seed` (not from `init`'s rng), so the
      frozen tree is a function of W alone; unused when `niter` is None.
    rank_pattern: `{regex: rank}` overrides of `rank`, first match wins.
    dropout: dropout on the input of the adapter path (training only), in [0, 1).

  Returns:
    An `Adapter` whose frozen tree holds the residual at each target and whose state is
      `{path: {'a': (in, r), 'b': (r, out)}}`; `apply` returns `LowRank` leaves. Invertible
      (`unmerge` gives back the residual).

  Raises:
    ValueError: `dropout` outside [0, 1), or `niter` neither None nor an int >= 0; from
      `init`, a rank that is not a positive int or exceeds min(in, out).
    PatternError: from `init`, a target or `rank_pattern` regex that matches no 2-D param.

  Example:
    >>> import jax, jax.numpy as jnp, peftjax as pj
    >>> params = {'query': {'kernel': jax.random.normal(jax.random.key(0), (8, 8))}}
    >>> adapter = pj.pissa('query/kernel', rank=2)
    >>> frozen, state = adapter.init(jax.random.key(0), params)
    >>> state['query/kernel']['a'].shape, state['query/kernel']['b'].shape
    ((8, 2), (2, 8))
    >>> merged = pj.merge(adapter, frozen, state)  # residual + A @ B: W at init
    >>> bool(jnp.allclose(merged['query']['kernel'], params['query']['kernel'], atol=1e-5))
    True
  """
  return _principal('pissa', targets, rank, alpha, minor=False, niter=niter, seed=seed,
                    rank_pattern=rank_pattern, dropout=dropout)


def milora(targets, rank: int = 8, alpha: float | None = None, *,
           rank_pattern: dict | None = None, dropout: float = 0.0) -> Adapter:
  """MiLoRA: PiSSA's construction on the r smallest singular triplets of W.

  "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM Finetuning"
  (Wang et al., NAACL 2025, arXiv:2406.09044). A = U_r S_r^1/2, B = S_r^1/2 V_r^T from the
  minor components (exact SVD only: a randomised SVD does not resolve them), over the frozen
  residual W - U_r S_r V_r^T, so the weight at init is W.

  Args:
    targets: a regex or a list of regexes, each matching a 2-D parameter (as `pissa`).
    rank: the rank r, a positive int <= min(in, out).
    alpha: scale = alpha / r; None (the default) gives scale 1 (as `pissa`).
    rank_pattern: `{regex: rank}` overrides of `rank`, first match wins.
    dropout: dropout on the input of the adapter path (training only), in [0, 1).

  Returns:
    An `Adapter` whose frozen tree holds the residual at each target and whose state is
      `{path: {'a': (in, r), 'b': (r, out)}}`; `apply` returns `LowRank` leaves. Invertible.

  Raises:
    ValueError: `dropout` outside [0, 1); from `init`, a rank that is not a positive int or
      exceeds min(in, out).
    PatternError: from `init`, a target or `rank_pattern` regex that matches no 2-D param.

  Example:
    >>> import jax, jax.numpy as jnp, peftjax as pj
    >>> params = {'query': {'kernel': jax.random.normal(jax.random.key(0), (8, 8))}}
    >>> adapter = pj.milora('query/kernel', rank=2)
    >>> frozen, state = adapter.init(jax.random.key(0), params)
    >>> state['query/kernel']['a'].shape, state['query/kernel']['b'].shape
    ((8, 2), (2, 8))
  """
  return _principal('milora', targets, rank, alpha, minor=True, rank_pattern=rank_pattern,
                    dropout=dropout)


def soma(targets, rank: int = 8, alpha: float | None = None, *,
         rank_pattern: dict | None = None, dropout: float = 0.0) -> Adapter:
  """SoMA: the minor-component adapter of MiLoRA.

  "SoMA: Singular Value Decomposed Minor Components Adaptation for Domain Generalizable
  Representation Learning" (Yun et al., CVPR 2025, arXiv:2412.04077). The rest of SoMA's
  recipe is outside the adapter: freeze the first blocks by targeting only the later ones
  (e.g. `soma('encoder/layer_[3-5]/.*/kernel')`), train the biases too with
  `pj.chain(soma(...), pj.full('.*/bias'))`, and anneal the weight decay with an optax
  schedule in a custom optimiser (the trainer's `optimizer.weight_decay` is constant).

  Args:
    targets: a regex or a list of regexes, each matching a 2-D parameter (as `pissa`).
    rank: the rank r, a positive int <= min(in, out).
    alpha: scale = alpha / r; None (the default) gives scale 1 (as `pissa`).
    rank_pattern: `{regex: rank}` overrides of `rank`, first match wins.
    dropout: dropout on the input of the adapter path (training only), in [0, 1).

  Returns:
    As `milora`: state `{path: {'a': (in, r), 'b': (r, out)}}` over frozen residuals.

  Raises:
    ValueError: as `milora`.
    PatternError: as `milora`.

  Example:
    >>> import jax, jax.numpy as jnp, peftjax as pj
    >>> kernel = jax.random.normal(jax.random.key(0), (8, 8))
    >>> params = {'query': {'kernel': kernel, 'bias': jnp.zeros(8)}}
    >>> adapter = pj.chain(pj.soma('query/kernel', rank=2), pj.full('query/bias'))
    >>> frozen, state = adapter.init(jax.random.key(0), params)
    >>> print(pj.summary(adapter, frozen, state).splitlines()[-1])
    trainable params: 40 || all params: 112 || trainable%: 35.7143
  """
  return _principal('soma', targets, rank, alpha, minor=True, rank_pattern=rank_pattern,
                    dropout=dropout)


# ------------------------------------------------------------------------------------- SORSA
SORSA_UPDATES = ('gradient', 'loss')


def _fro(x):
  """Frobenius norm whose gradient at 0 is 0 (as torch.norm's), not NaN."""
  sq = jnp.sum(x * x)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _is_factors(x) -> bool:
  """A SORSA target's {'u', 's', 'vt'}."""
  return is_entry(x, ('u', 's', 'vt'))


def orthonormality(state) -> jax.Array:
  """SORSA's regulariser (`calc_ortho` of the official code): the mean over every U_p and V_p
  of the (unsquared) Frobenius norms ||U_p^T U_p - I||_F and ||V_p^T V_p - I||_F. `state` may
  be any tree holding SORSA targets (e.g. a chain's)."""
  terms = []
  for st in filter(_is_factors, jax.tree.leaves(state, is_leaf=_is_factors)):
    u, vt = st['u'].astype(jnp.float32), st['vt'].astype(jnp.float32)
    eye = jnp.eye(u.shape[1], dtype=jnp.float32)
    terms += [_fro(u.T @ u - eye), _fro(vt @ vt.T - eye)]
  return sum(terms) / len(terms)


def sorsa(targets, rank: int = 8, *, gamma: float = 4e-4, update: str = 'gradient',
          niter: int | None = None, seed: int = 0, rank_pattern: dict | None = None,
          dropout: float = 0.0) -> Adapter:
  """SORSA: trainable top singular factors of W, kept orthonormal by a regulariser.

  "SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation of Large
  Language Models" (Cao, 2024, arXiv:2409.00055). Trainable U_p (in, r), S_p (r,),
  V_p^T (r, out) from the top-r SVD of W run over the frozen residual W - U_p S_p V_p^T: the
  weight is residual + (U_p * S_p) @ V_p^T (W at init). The regulariser
  R = `orthonormality(state)` (0 at init) keeps U_p and V_p orthonormal. The paper's update
  is W_p <- W_p - eta_t grad L - gamma grad R: the regulariser's step is gamma, not tied to
  the learning rate.

  Args:
    targets: a regex or a list of regexes, each matching a 2-D parameter (as `pissa`).
    rank: the rank r, a positive int <= min(in, out).
    gamma: the regulariser's weight, >= 0 (the paper's 4e-4).
    update: 'gradient' (the default, the official trainer): after gradient clipping, the
      optimiser receives grad L + (gamma / lr) grad R, lr being the optimiser's peak
      learning rate (the adapter's `tx`, built by `make_optimizer` with that lr). 'loss':
      gamma * R is added to the training loss instead (clipped and scaled with it).
    niter: None (the default) for the exact SVD; an int >= 0 for a randomised SVD with
      `niter` subspace iterations (as `pissa`).
    seed: the randomised SVD's sketch draws from `seed`; unused when `niter` is None.
    rank_pattern: `{regex: rank}` overrides of `rank`, first match wins.
    dropout: dropout on the input of the adapter path (training only), in [0, 1).

  Returns:
    An `Adapter` whose frozen tree holds the residual at each target and whose state is
      `{path: {'u': (in, r), 's': (r,), 'vt': (r, out)}}`; `apply` returns `LowRank` leaves.
      With update='gradient' its `tx` is a function of the peak learning rate; with 'loss'
      its `loss` is gamma * R. Invertible.

  Raises:
    ValueError: `gamma` < 0, an unknown `update`, or `dropout` outside [0, 1); from `init`,
      a rank that is not a positive int or exceeds min(in, out), or `niter` < 0; from `tx`,
      a peak learning rate <= 0.
    PatternError: from `init`, a target or `rank_pattern` regex that matches no 2-D param.

  Example:
    >>> import jax, jax.numpy as jnp, peftjax as pj
    >>> params = {'query': {'kernel': jax.random.normal(jax.random.key(0), (8, 8))}}
    >>> adapter = pj.sorsa('query/kernel', rank=2)
    >>> frozen, state = adapter.init(jax.random.key(0), params)
    >>> jax.tree.map(jnp.shape, state)
    {'query/kernel': {'s': (2,), 'u': (8, 2), 'vt': (2, 8)}}
    >>> from peftjax.methods.svd_init import orthonormality
    >>> float(orthonormality(state)) < 1e-5  # R is 0 at init
    True
  """
  check_dropout('sorsa', dropout)
  if gamma < 0:
    raise ValueError(f'sorsa gamma must be >= 0, got {gamma}')
  if update not in SORSA_UPDATES:
    raise ValueError(f'sorsa update must be one of {SORSA_UPDATES}, got {update!r}')
  config = dict(method='sorsa', targets=target_list(targets), rank=rank, gamma=gamma,
                update=update, niter=niter, seed=seed, rank_pattern=dict(rank_pattern or {}),
                dropout=dropout)

  def init(rng, params, *, calib=None):
    del rng, calib
    flat, chosen = select_matrices(params, config['targets'], rank_pattern=rank_pattern)
    state = {}
    for path in chosen:
      w = materialize(flat[path])
      r = check_rank('sorsa', path, P.first_match(path, rank_pattern, rank), w.shape)
      u, s, vt = _top(w, r, niter, seed, path)
      flat[path] = (w - (u * s) @ vt).astype(w.dtype)
      state[path] = {'u': u.astype(w.dtype), 's': s.astype(w.dtype), 'vt': vt.astype(w.dtype)}
    return P.unflatten(flat), state

  def leaf(path, w, st):
    chex.assert_shape([st['u'], st['s'], st['vt']],
                      [(w.shape[0], None), (st['u'].shape[1],), (st['u'].shape[1], w.shape[1])],
                      custom_message=f'sorsa factors of {path}')
    return LowRank(w, st['u'] * st['s'], st['vt'], 1.0, dropout)

  def tx(lr: float) -> optax.GradientTransformation:
    """Adds (gamma / lr) grad R to the adapter's gradients."""
    if not lr > 0:
      raise ValueError(f'sorsa needs the optimiser\'s peak learning rate > 0, got {lr}')

    def update_fn(updates, state, params=None):
      if params is None:
        raise ValueError('sorsa\'s transform needs the params (optax update(..., params))')
      reg = jax.grad(orthonormality)(params)
      return jax.tree.map(lambda g, d: g + (gamma / lr) * d.astype(g.dtype), updates, reg), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)

  def unmerge(merged, state):
    return _rebuild(merged, state,
                    lambda p, m, st: m - ((st['u'] * st['s']) @ st['vt']).astype(m.dtype))

  def describe(frozen, state):
    flat = P.flatten(frozen)
    return {p: _info(flat[p], sum(x.size for x in st.values()), rank=int(st['s'].shape[0]))
            for p, st in state.items()}

  by_update = ({'tx': tx} if update == 'gradient'
               else {'loss': lambda state: gamma * orthonormality(state)})
  return Adapter(init=init, apply=lambda frozen, state: _rebuild(frozen, state, leaf),
                 config=config, unmerge=unmerge, describe=describe, **by_update)


# ------------------------------------------------------------------------------------- SVFit
def svfit(targets, rank: int | None = 8, *, energy: float = 0.99,
          rank_pattern: dict | None = None) -> Adapter:
  """SVFit: only the top-r singular values of W train; the singular vectors stay fixed.

  "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values"
  (Sun et al., 2024, arXiv:2409.05926). With the top-r SVD U_r S_r V_r^T of W, the residual
  W - U_r S_r V_r^T is frozen and the weight is residual + U_r diag(s) V_r^T, s starting at
  S_r. The paper trains the values holding 99% of the spectrum's energy (hundreds per
  kernel, not 8): its setting is `svfit(targets, rank=None)`.

  Args:
    targets: a regex or a list of regexes, each matching a 2-D parameter (as `pissa`).
    rank: the rank r, a positive int <= min(in, out); None picks, per target, the smallest r
      whose values hold `energy` of the spectrum's energy (sum of s_i^2).
    energy: the share `rank=None` keeps, in (0, 1].
    rank_pattern: `{regex: rank or None}` overrides of `rank`, first match wins.

  Returns:
    An `Adapter` whose frozen tree holds, at each target,
      `LowRank(residual, U_r, V_r^T, 0.0)` (the fixed factors beside the residual, their
      delta off) and whose state is `{path: {'s': (r,)}}`; `apply` returns `LowRank` leaves.
      Not invertible: it has no `unmerge`.

  Raises:
    ValueError: `energy` outside (0, 1]; from `init`, a rank that is not a positive int or
      exceeds min(in, out); from `apply`, a frozen tree that is not this `init`'s (no fixed
      factors at a target).
    PatternError: from `init`, a target or `rank_pattern` regex that matches no 2-D param.

  Example:
    >>> import jax, jax.numpy as jnp, peftjax as pj
    >>> params = {'query': {'kernel': jax.random.normal(jax.random.key(0), (8, 8))}}
    >>> adapter = pj.svfit('query/kernel', rank=2)
    >>> frozen, state = adapter.init(jax.random.key(0), params)
    >>> jax.tree.map(jnp.shape, state)
    {'query/kernel': {'s': (2,)}}
    >>> type(frozen['query']['kernel']).__name__
    'LowRank'
  """
  if not 0.0 < energy <= 1.0:
    raise ValueError(f'svfit energy must be in (0, 1], got {energy}')
  config = dict(method='svfit', targets=target_list(targets), rank=rank, energy=energy,
                rank_pattern=dict(rank_pattern or {}))

  def init(rng, params, *, calib=None):
    del rng, calib
    flat, chosen = select_matrices(params, config['targets'], rank_pattern=rank_pattern)
    state = {}
    for path in chosen:
      w = materialize(flat[path])
      r = P.first_match(path, rank_pattern, rank)
      if r is None:
        r = linalg.energy_rank(linalg.svd(w)[1], energy)
      u, s, vt = linalg.svd_top(w, check_rank('svfit', path, r, w.shape))
      residual = (w - (u * s) @ vt).astype(w.dtype)
      flat[path] = LowRank(residual, u.astype(w.dtype), vt.astype(w.dtype), 0.0)
      state[path] = {'s': s.astype(w.dtype)}
    return P.unflatten(flat), state

  def leaf(path, f, st):
    f = _fixed('svfit', path, f)
    chex.assert_shape(st['s'], (f.a.shape[1],), custom_message=f'svfit values of {path}')
    return LowRank(f.w, f.a * st['s'], f.b, 1.0)

  def describe(frozen, state):
    flat = P.flatten(frozen)
    return {p: _info(flat[p], st['s'].size, rank=int(st['s'].shape[0]))
            for p, st in state.items()}

  return Adapter(init=init, apply=lambda frozen, state: _rebuild(frozen, state, leaf),
                 config=config, describe=describe)


# ------------------------------------------------------------------------------------- LoLDU
def loldu(targets, rank: int = 8, alpha: float | None = 1.0, *,
          rank_pattern: dict | None = None) -> Adapter:
  """LoLDU: only an LDU diagonal and a scale train, over fixed triangular factors of W.

  "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient
  Fine-Tuning" (Shi et al., 2024, arXiv:2410.13618). As in the reference code, the (out, in)
  weight W^T = P L diag(D) U (partial pivoting) gives fixed rank-r factors P L_r and U_r; the
  diagonal d = D_r and a scalar scale train over the frozen residual
  W - scale U_r^T diag(d) (P L_r)^T, so the weight at init is W.

  Args:
    targets: a regex or a list of regexes, each matching a 2-D parameter (as `pissa`).
    rank: the rank r, a positive int <= min(in, out); `rank=min(in, out)` trains the whole
      diagonal (the reference's default layer config uses rank 768).
    alpha: the scale starts at alpha / r; None: at 1. The default 1 (scale 1 / r) is the
      reference's `LoLDUParametrization.from_linear`.
    rank_pattern: `{regex: rank}` overrides of `rank`, first match wins.

  Returns:
    An `Adapter` whose frozen tree holds, at each target,
      `LowRank(residual, U_r^T, (P L_r)^T, 0.0)` (the fixed factors, their delta off) and
      whose state is `{path: {'d': (r,), 'scale': ()}}`; `apply` returns `LowRank` leaves.
      Not invertible: it has no `unmerge`.

  Raises:
    ValueError: from `init`, a rank that is not a positive int or exceeds min(in, out); from
      `apply`, a frozen tree that is not this `init`'s (no fixed factors at a target).
    PatternError: from `init`, a target or `rank_pattern` regex that matches no 2-D param.

  Example:
    >>> import jax, jax.numpy as jnp, peftjax as pj
    >>> params = {'query': {'kernel': jax.random.normal(jax.random.key(0), (8, 8))}}
    >>> adapter = pj.loldu('query/kernel', rank=2)
    >>> frozen, state = adapter.init(jax.random.key(0), params)
    >>> jax.tree.map(jnp.shape, state)
    {'query/kernel': {'d': (2,), 'scale': ()}}
    >>> float(state['query/kernel']['scale'])  # alpha / r
    0.5
  """
  config = dict(method='loldu', targets=target_list(targets), rank=rank, alpha=alpha,
                rank_pattern=dict(rank_pattern or {}))

  def init(rng, params, *, calib=None):
    del rng, calib
    flat, chosen = select_matrices(params, config['targets'], rank_pattern=rank_pattern)
    state = {}
    for path in chosen:
      w = materialize(flat[path])
      r = check_rank('loldu', path, P.first_match(path, rank_pattern, rank), w.shape)
      p, l, d, u = linalg.ldu(w.T)
      a, b, d = u[:r].T, (p @ l[:, :r]).T, d[:r]
      scale = scaling(alpha, r)
      residual = (w - scale * (a * d) @ b).astype(w.dtype)
      flat[path] = LowRank(residual, a.astype(w.dtype), b.astype(w.dtype), 0.0)
      state[path] = {'d': d.astype(w.dtype), 'scale': jnp.asarray(scale, w.dtype)}
    return P.unflatten(flat), state

  def leaf(path, f, st):
    f = _fixed('loldu', path, f)
    chex.assert_shape([st['d'], st['scale']], [(f.a.shape[1],), ()],
                      custom_message=f'loldu diagonal and scale of {path}')
    return LowRank(f.w, f.a * (st['d'] * st['scale']), f.b, 1.0)

  def describe(frozen, state):
    flat = P.flatten(frozen)
    return {p: _info(flat[p], st['d'].size + 1, rank=int(st['d'].shape[0]))
            for p, st in state.items()}

  return Adapter(init=init, apply=lambda frozen, state: _rebuild(frozen, state, leaf),
                 config=config, describe=describe)


# -------------------------------------------------------------------------------------- SoKA
def soka(targets, rank: int | str = 'auto', *, energy: float = 0.9, max_rank: int | None = None,
         rank_pattern: dict | None = None, factor_pattern: dict | None = None) -> Adapter:
  """SoKA: trainable Kronecker factors from the Kronecker-product SVD of W, adaptive rank.

  "Singular Value Decomposition on Kronecker Adaptation for Large Language Model" (Chong &
  Qu, 2025, arXiv:2506.15251). The Kronecker-product SVD W = sum_k s_k A_k (x) B_k
  (Van Loan-Pitsianis) gives trainable factors a_k = s_k^1/2 A_k (m1, n1),
  b_k = s_k^1/2 B_k (m2, n2) for the kept components over the frozen residual; the weight is
  residual + sum_k a_k (x) b_k (a plain array), W at init.

  Factor shapes: m1 is the largest divisor of `in` <= sqrt(in) and n2 the largest divisor of
  `out` <= sqrt(out) (m2 = in / m1, n1 = out / n2), so A (m1, n1) and B (m2, n2) hold about
  sqrt(in * out) entries each: the most balanced split, with the largest Kronecker rank
  K = min(m1 n1, m2 n2).

  Args:
    targets: a regex or a list of regexes, each matching a 2-D parameter (as `pissa`).
    rank: a positive int <= K; 'energy', the smallest k whose components hold `energy` of the
      Kronecker spectrum's energy; 'elbow', the components up to the spectrum's elbow (the
      point farthest from its chord, `linalg.elbow_rank`); or 'auto' (the default), the
      smaller of the two (a component negligible by either criterion is pruned).
    energy: the threshold of 'energy' and 'auto', in (0, 1].
    max_rank: caps the adaptive choices; None: no cap.
    rank_pattern: `{regex: rank}` overrides of `rank` (ints or the strings above), first
      match wins.
    factor_pattern: `{regex: [m1, n1]}` overrides of the first factor's shape; m1 must
      divide `in` and n1 `out`.

  Returns:
    An `Adapter` whose frozen tree holds the residual at each target and whose state is
      `{path: {'a': (k, m1, n1), 'b': (k, m2, n2)}}`; `apply` returns plain arrays. Invertible.
      `describe` adds the factor shapes and the energy the kept components hold.

  Raises:
    ValueError: `energy` outside (0, 1], or a string rank not in `KRON_RANKS`; from `init`,
      a rank (after `max_rank`) that is not a positive int or exceeds K, or a factor shape
      that does not divide the weight's.
    PatternError: from `init`, a target, `rank_pattern` or `factor_pattern` regex that
      matches no 2-D param.

  Example:
    On an exact Kronecker product, the adaptive rank keeps one component:

    >>> import jax, jax.numpy as jnp, peftjax as pj
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> kernel = jnp.kron(jax.random.normal(k1, (2, 4)), jax.random.normal(k2, (4, 2)))
    >>> adapter = pj.soka('query/kernel')
    >>> frozen, state = adapter.init(jax.random.key(0), {'query': {'kernel': kernel}})
    >>> jax.tree.map(jnp.shape, state)
    {'query/kernel': {'a': (1, 2, 4), 'b': (1, 4, 2)}}
  """
  if not 0.0 < energy <= 1.0:
    raise ValueError(f'soka energy must be in (0, 1], got {energy}')
  for r in [rank, *(rank_pattern or {}).values()]:
    if isinstance(r, str) and r not in KRON_RANKS:
      raise ValueError(f'soka rank {r!r} must be an int or one of {KRON_RANKS}')
  config = dict(method='soka', targets=target_list(targets), rank=rank, energy=energy,
                max_rank=max_rank, rank_pattern=dict(rank_pattern or {}),
                factor_pattern={k: list(v) for k, v in (factor_pattern or {}).items()})

  def shapes(path, shape):
    (d_in, d_out), custom = shape, P.first_match(path, factor_pattern, None)
    m1, n1 = custom if custom is not None else (linalg.kron_shape(d_in)[0],
                                                linalg.kron_shape(d_out)[1])
    return m1, n1

  def choose(path, s, shape):
    r = P.first_match(path, rank_pattern, rank)
    if isinstance(r, str):
      by_energy, by_elbow = linalg.energy_rank(s, energy), linalg.elbow_rank(s)
      r = {'energy': by_energy, 'elbow': by_elbow, 'auto': min(by_energy, by_elbow)}[r]
      r = r if max_rank is None else min(r, max_rank)
    return check_rank('soka', path, r, shape, limit=len(s))

  def init(rng, params, *, calib=None):
    del rng, calib
    flat, chosen = select_matrices(params, config['targets'], rank_pattern=rank_pattern,
                                   factor_pattern=factor_pattern)
    state = {}
    for path in chosen:
      w = materialize(flat[path])
      a, s, b = linalg.kpsvd(w, shapes(path, w.shape))
      r = choose(path, s, w.shape)
      root = jnp.sqrt(s[:r])[:, None, None]
      a, b = a[:r] * root, b[:r] * root
      flat[path] = (w - linalg.kron_sum(a, b)).astype(w.dtype)
      state[path] = {'a': a.astype(w.dtype), 'b': b.astype(w.dtype)}
    return P.unflatten(flat), state

  def leaf(path, w, ab):
    chex.assert_rank([ab['a'], ab['b']], 3)
    chex.assert_equal_shape_prefix([ab['a'], ab['b']], 1)
    m1, n1 = ab['a'].shape[1:]
    m2, n2 = ab['b'].shape[1:]
    chex.assert_shape(w, (m1 * m2, n1 * n2), custom_message=f'soka factors of {path}')
    return w + linalg.kron_sum(ab['a'], ab['b']).astype(w.dtype)

  def unmerge(merged, state):
    return _rebuild(merged, state,
                    lambda p, m, ab: m - linalg.kron_sum(ab['a'], ab['b']).astype(m.dtype))

  def describe(frozen, state):
    """Adds the factor shapes and the energy share of the Kronecker part, |dW|^2 / (|dW|^2 +
    |residual|^2): at init exactly the KPSVD energy of the kept components."""
    flat, out = P.flatten(frozen), {}
    for p, ab in state.items():
      delta = float(jnp.sum(linalg.kron_sum(ab['a'], ab['b']).astype(jnp.float32) ** 2))
      rest = float(jnp.sum(materialize(flat[p]).astype(jnp.float32) ** 2))
      dims = lambda x: 'x'.join(map(str, x.shape[1:]))
      out[p] = _info(flat[p], ab['a'].size + ab['b'].size, rank=int(ab['a'].shape[0]),
                     factors=f"{dims(ab['a'])}*{dims(ab['b'])}",
                     energy=delta / (delta + rest) if delta + rest > 0 else 1.0)
    return out

  return Adapter(init=init, apply=lambda frozen, state: _rebuild(frozen, state, leaf),
                 config=config, unmerge=unmerge, describe=describe)
