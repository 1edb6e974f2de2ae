"""LoRA-Pro: "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?" (Wang & Liang, 2024).

A LoRA step is a full fine-tuning step with a low-rank "equivalent gradient"; LoRA-Pro picks
the LoRA factor gradients whose equivalent gradient is closest to the full gradient.

Derivation in the Flax layout. W_eff = W + s·A@B with A (n=in, r), B (r, m=out), and G =
dL/dW_eff (n, m), so the LoRA gradients are g_A = s·G·Bᵀ and g_B = s·Aᵀ·G. A step
(A, B) -= η(ĝ_A, ĝ_B) moves W_eff by -η·s(ĝ_A·B + A·ĝ_B) + O(η²): the equivalent gradient is
G̃ = s(ĝ_A·B + A·ĝ_B). Theorem 2.1: minimise ‖G̃ − G‖_F. The normal equations are
  s²(ĝ_A·BBᵀ + A·ĝ_B·Bᵀ) = g_A   and   s²(AᵀA·ĝ_B + Aᵀ·ĝ_A·B) = g_B,
in which G enters only through g_A and g_B. With P_A = A(AᵀA)⁻¹Aᵀ and P_B = Bᵀ(BBᵀ)⁻¹B,
every solution is
  ĝ_A = (1/s²)·g_A·(BBᵀ)⁻¹ + A·Y,      ĝ_B = (1/s²)·(AᵀA)⁻¹·g_B·(I − P_B) − Y·B,
for any r×r Y (the pair (A·Y, −Y·B) leaves G̃ unchanged), and G̃ = G·P_B + P_A·G·(I − P_B),
the orthogonal projection of G onto {X·B + A·Y} (check: ĝ_A·B = (1/s)·G·P_B and
A·ĝ_B = (1/s)·P_A·G·(I − P_B)). This is the paper's Theorem 2.1 transposed: torch's
(B_t, A_t) = (Bᵀ, Aᵀ) here, and the paper's X is Yᵀ.
Theorem 2.2 picks Y closest to plain LoRA, minimising ‖ĝ_A − g_A‖² + ‖ĝ_B − g_B‖². Writing
ĝ⁰ for the Y = 0 solution, setting the derivative in Y to zero gives the Sylvester equation
  AᵀA·Y + Y·BBᵀ = Aᵀ(g_A − ĝ⁰_A) + (ĝ⁰_B − g_B)·Bᵀ,
which reduces to the paper's BᵀB·X + X·AAᵀ = −(1/s²)(BᵀB)⁻¹·g_A·Aᵀ (transposed) because
Aᵀ·g_A = g_B·Bᵀ = s·AᵀGBᵀ and (I − P_B)·Bᵀ = 0. We solve the general form (exact even for
inconsistent g_A, g_B) by eigendecomposing the symmetric r×r AᵀA and BBᵀ.

Damping: AᵀA and BBᵀ get +ε·I and are inverted as pseudo-inverses (eigenvalues below
r·eps(dtype) of the largest count as zero, as torch's `pinv` in the authors' code does); the
Sylvester solve thus minimises the criterion plus 2ε‖Y‖². At LoRA's zero init (B = 0),
g_A = 0 and ĝ_B = (1/s²)(AᵀA)⁻¹g_B. Note ĝ_A grows like 1/‖B‖ while B is small: the closed
form is scale-covariant, not bounded.

Two optimisers, as in the authors' code (peta/optim.py):
- `lora_pro`: the closed-form adjustment alone, rank-r work only. Followed by `optax.sgd` it
  is the paper's SGD LoRA-Pro; followed by AdamW (as `train.step.make_optimizer` does with an
  adapter's `tx`) it is the authors' default `mode="efficient"`: Adam moments of ĝ_A, ĝ_B.
- `lora_pro_adamw`: the paper's AdamW-equivalent algorithm (`mode="full"`): full-size Adam
  moments of the equivalent gradient G̃ (2·in·out floats per target, as full fine-tuning),
  the Adam direction projected back to (ĝ_A, ĝ_B) by the closed form. It is a complete
  optimiser (it applies the learning rate): use it *instead of* AdamW, never before it.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax.core import paths as P
from peftjax.core.adapter import is_entry

X_MODES = ('sylvester', 'zero')


def _is_pair(x) -> bool:
  """A LoRA target's `{'a', 'b'}`."""
  return is_entry(x, ('a', 'b'))


def _scale_fn(scales) -> Callable[[str], float]:
  if callable(scales):
    return scales
  if isinstance(scales, Mapping):
    def lookup(path):
      if path not in scales:
        raise KeyError(f'lora_pro: no scale for target {path!r}; scales has {sorted(scales)}')
      return scales[path]
    return lookup
  return lambda path: float(scales)


def _pairs(tree, *others):
  """`(paths, leaves, treedef)` of the `{'a', 'b'}` LoRA pairs of `tree` (and of `others`)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_pair)
  bad = [P.path_str(kp) for kp, leaf in flat if not _is_pair(leaf)]
  if bad:
    raise ValueError(f'lora_pro transforms LoRA states {{path: {{"a", "b"}}}} only; found other '
                     f'leaves {bad[:3]} (mask them out, e.g. with optax.multi_transform)')
  paths = [P.path_str(kp[-1:]) for kp, _ in flat]
  return paths, [[leaf for _, leaf in flat]] + [treedef.flatten_up_to(o) for o in others], treedef


class _Gram(NamedTuple):
  """Eigendecompositions of AᵀA and BBᵀ (damped) and their pseudo-inverses."""
  la: jax.Array
  ua: jax.Array
  lb: jax.Array
  ub: jax.Array
  inv_a: jax.Array
  inv_b: jax.Array


def _cutoff(x):
  return x > x.shape[0] * jnp.finfo(x.dtype).eps * jnp.max(x)


def _gram(a, b, damping) -> _Gram:
  def eig(m):
    lam, u = jnp.linalg.eigh(m)
    lam = jnp.maximum(lam, 0.0) + damping
    inv = jnp.where(_cutoff(lam), 1.0 / jnp.where(lam > 0, lam, 1.0), 0.0)
    return lam, u, (u * inv) @ u.T
  la, ua, inv_a = eig(a.T @ a)
  lb, ub, inv_b = eig(b @ b.T)
  return _Gram(la, ua, lb, ub, inv_a, inv_b)


def _sylvester(gram: _Gram, c):
  """Y with (AᵀA + εI)·Y + Y·(BBᵀ + εI) = c, in the two eigenbases."""
  denom = gram.la[:, None] + gram.lb[None, :]
  keep = denom > denom.shape[0] * jnp.finfo(denom.dtype).eps * jnp.max(denom)
  f = gram.ua.T @ c @ gram.ub
  return gram.ua @ jnp.where(keep, f / jnp.where(keep, denom, 1.0), 0.0) @ gram.ub.T


def _adjust(gram: _Gram, g_a, g_b, a, b, scale, x_mode):
  s2 = scale * scale
  ga = g_a @ gram.inv_b / s2
  gb = gram.inv_a @ (g_b - (g_b @ b.T) @ gram.inv_b @ b) / s2
  if x_mode == 'sylvester':
    y = _sylvester(gram, a.T @ (g_a - ga) + (gb - g_b) @ b.T)
    ga, gb = ga + a @ y, gb - y @ b
  return ga, gb


def _f32(*xs):
  dtype = jnp.promote_types(xs[0].dtype, jnp.float32)
  return [x.astype(dtype) for x in xs]


def _check(x_mode, damping, scale):
  if x_mode not in X_MODES:
    raise ValueError(f'lora_pro x_mode must be one of {X_MODES}, got {x_mode!r}')
  if not damping >= 0:
    raise ValueError(f'lora_pro damping must be >= 0, got {damping}')
  if scale is not None and not scale > 0:
    raise ValueError(f'lora_pro needs a positive LoRA scale, got {scale}')


def adjusted_grads(g_a, g_b, a, b, scale: float, *, x_mode: str = 'sylvester',
                   damping: float = 1e-8):
  """LoRA-Pro's closed-form (ĝ_A, ĝ_B) for one target: A (in, r), B (r, out), W + s·A@B."""
  _check(x_mode, damping, scale)
  dtype = g_a.dtype
  g_a, g_b, a, b = _f32(g_a, g_b, a, b)
  ga, gb = _adjust(_gram(a, b, damping), g_a, g_b, a, b, scale, x_mode)
  return ga.astype(dtype), gb.astype(dtype)


def equivalent_gradient(g_a, g_b, a, b, scale: float):
  """s(g_A·B + A·g_B): the full-size move of W_eff per unit step along (-g_A, -g_B)."""
  return scale * (g_a @ b + a @ g_b)


def lora_pro(scales, *, x_mode: str = 'sylvester', damping: float = 1e-8
             ) -> optax.GradientTransformation:
  """Replaces each LoRA target's (g_A, g_B) by LoRA-Pro's adjusted gradients.

  Args:
    scales: the LoRA scale s: a float, `{target path: s}`, or a function of the target path
      (the dict key above `{'a', 'b'}` in the adapter state).
    x_mode: 'sylvester' (Theorem 2.2, closest to plain LoRA's gradients) or 'zero' (X = 0).
    damping: ε added to AᵀA and BBᵀ before inverting.
  Stateless; `update` needs the current params. Rank-r work only.
  """
  _check(x_mode, damping, None)
  scale_of = _scale_fn(scales)

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('lora_pro needs the current params: tx.update(grads, state, params)')
    paths, (gs, ps), treedef = _pairs(updates, params)
    out = []
    for path, g, p in zip(paths, gs, ps):
      ga, gb = adjusted_grads(g['a'], g['b'], p['a'], p['b'], scale_of(path),
                              x_mode=x_mode, damping=damping)
      out.append({'a': ga, 'b': gb})
    return treedef.unflatten(out), state

  return optax.GradientTransformation(init, update)


class LoRAProAdamState(NamedTuple):
  """Step count and, per target, full-size (in, out) Adam moments of the equivalent gradient."""
  count: jax.Array
  mu: Any
  nu: Any


def lora_pro_adamw(scales, learning_rate, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 0.0, *,
                   x_mode: str = 'sylvester', damping: float = 1e-8
                   ) -> optax.GradientTransformation:
  """The paper's AdamW-equivalent LoRA-Pro: a complete optimiser for LoRA states.

  Per target: G̃ = equivalent gradient of the adjusted (ĝ_A, ĝ_B); Adam moments of G̃;
  D = m̂ / (√v̂ + eps) taken as a full gradient (g_A = s·D·Bᵀ, g_B = s·Aᵀ·D) and adjusted
  again (with X); update -lr·(ĝ_A, ĝ_B). Weight decay scales A and B by √(1 − lr·λ), so that
  A@B decays by (1 − lr·λ) as in the authors' code; unlike there, the frozen W is not decayed
  (peftjax never updates it). Memory: two float32 (in, out) arrays per target.
  """
  _check(x_mode, damping, None)
  scale_of = _scale_fn(scales)

  def init(params):
    _, (ps,), treedef = _pairs(params)
    zeros = treedef.unflatten([jnp.zeros((p['a'].shape[0], p['b'].shape[1]),
                                         jnp.promote_types(p['a'].dtype, jnp.float32))
                               for p in ps])
    return LoRAProAdamState(jnp.zeros((), jnp.int32), zeros, zeros)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('lora_pro_adamw needs the current params: tx.update(grads, state, params)')
    paths, (gs, ps, mus, nus), treedef = _pairs(updates, params, state.mu, state.nu)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    count = optax.safe_increment(state.count)
    bc1, bc2 = 1 - b1 ** count, 1 - b2 ** count
    decay = jnp.sqrt(1.0 - lr * weight_decay) - 1.0
    out, new_mu, new_nu = [], [], []
    for path, g, p, mu, nu in zip(paths, gs, ps, mus, nus):
      s = scale_of(path)
      g_a, g_b, a, b = _f32(g['a'], g['b'], p['a'], p['b'])
      gram = _gram(a, b, damping)
      ga, gb = _adjust(gram, g_a, g_b, a, b, s, 'zero')  # X does not change G̃
      equiv = equivalent_gradient(ga, gb, a, b, s)
      mu = b1 * mu + (1 - b1) * equiv
      nu = b2 * nu + (1 - b2) * equiv * equiv
      d = (mu / bc1) / (jnp.sqrt(nu / bc2) + eps)
      ga, gb = _adjust(gram, s * d @ b.T, s * a.T @ d, a, b, s, x_mode)
      out.append({'a': (-lr * ga + decay * a).astype(p['a'].dtype),
                  'b': (-lr * gb + decay * b).astype(p['b'].dtype)})
      new_mu.append(mu)
      new_nu.append(nu)
    return treedef.unflatten(out), LoRAProAdamState(
        count, treedef.unflatten(new_mu), treedef.unflatten(new_nu))

  return optax.GradientTransformation(init, update)
