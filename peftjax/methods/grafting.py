"""Skill localization by grafting: "Task-Specific Skill Localization in Fine-tuned Language
Models" (Panigrahi, Saunshi, Zhao & Arora, ICML 2023, arXiv:2302.06600).

Given pretrained weights θ_pre and fine-tuned ones θ_ft, a mask γ grafts the fine-tuned values
of a few entries onto the pretrained model: θ(γ) = (1 - γ) θ_pre + γ θ_ft (exactly θ_pre at
γ = 0 and θ_ft at γ = 1). The official code relaxes γ around a base patch γ_base (1 on the
top `sparsity` fraction of targeted entries by |θ_ft - θ_pre|, 0 elsewhere) as
γ_base + (1 - 2 γ_base) sigmoid(S - b) with S ~ U(0, 1) and b = `sigmoid_bias`. Here the
same γ is sigmoid(S - b) with S drawn from U(0, 1) off the patch and 2b - U(0, 1) on it
(the official S mirrored about b on the patch: the same γ and, coordinate-wise, the same
SGD or Adam steps), so γ starts within 1e-4 of the base patch at b = 10 and depends on the
state alone. The loss adds `l1 * ||γ||_1`, the relaxation of the paper's sparsity
constraint (the official code runs with none: l1 = 0 and a few steps). The official mask
training is no optimiser but plain gradient descent, S -= lr dL/dS with lr 1e7 (its
run_graft_task.sh), on the gradient averaged over 128 batches of 8, one step per 'epoch':
at b = 10, dγ/dS is 4.5e-5 and dL/dS far below 1e-8, so Adam's eps would swallow the
steps: the trainer's `optimizer.name = 'sgd'` takes them. `binarized_graft`
rounds γ (or keeps a chosen fraction of entries) and returns the grafted tree with the
fraction of targeted entries it takes from θ_ft.

The fine-tuned tree comes from `finetuned`: a params file (`peftjax.io.params_file`), an
adapter directory (merged into the params `init` receives, e.g. a full fine-tuning run's
`adapter/`), or, in-process, a param tree (such a method's config cannot rebuild it). The
fine-tuned values of the targets are kept in the frozen tree under `GRAFT` (by slash path);
the state is the scores S alone.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.core import paths as P
from peftjax.core.adapter import Adapter
from peftjax.core.leaves import materialize
from peftjax.methods.common import target_list

GRAFT = 'graft'  # the frozen tree's key for the fine-tuned targets


def graft_params(pre, ft, gamma):
  """(1 - γ) θ_pre + γ θ_ft for one array."""
  gamma = gamma.astype(pre.dtype)
  return (1 - gamma) * pre + gamma * ft


def masks(state, sigmoid_bias: float) -> dict[str, Any]:
  """γ = sigmoid(S - sigmoid_bias) of every target."""
  return {path: jax.nn.sigmoid(scores - sigmoid_bias) for path, scores in state.items()}


def grafted(frozen, gammas: dict[str, Any]):
  """The param tree with `gammas[path]` grafting each target's fine-tuned values."""
  if GRAFT not in frozen:
    raise ValueError(f'graft: the frozen tree has no {GRAFT!r} (fine-tuned targets); use the '
                     'frozen tree returned by graft.init')
  ft = P.flatten(frozen[GRAFT])
  flat = P.flatten({k: v for k, v in frozen.items() if k != GRAFT})
  for path, gamma in gammas.items():
    if gamma.shape != ft[path].shape:
      raise ValueError(f'graft mask of {path} is {gamma.shape}; the weight is '
                       f'{ft[path].shape}')
    flat[path] = graft_params(materialize(flat[path]), ft[path], gamma)
  return P.unflatten(flat)


def base_patch(pre: dict[str, Any], ft: dict[str, Any], sparsity: float) -> dict[str, Any]:
  """1 on the top `sparsity` fraction (rounded down) of all entries of `pre` / `ft` (flat
  dicts) by |θ_ft - θ_pre|, 0 elsewhere, as float32 arrays."""
  moves = {p: np.abs(np.asarray(ft[p], np.float32) - np.asarray(pre[p], np.float32)).ravel()
           for p in pre}
  every = np.concatenate(list(moves.values())) if moves else np.zeros(0, np.float32)
  k = int(sparsity * every.size)
  chosen = np.zeros(every.size, bool)
  if k:
    chosen[np.argsort(-every, kind='stable')[:k]] = True
  out, start = {}, 0
  for p, m in moves.items():
    out[p] = chosen[start:start + m.size].reshape(np.shape(pre[p])).astype(np.float32)
    start += m.size
  return out


def _load_finetuned(source, params):
  if not isinstance(source, (str, pathlib.Path)):
    return source
  path = pathlib.Path(source)
  if path.is_dir():
    from peftjax.io.adapter_file import load_adapter  # pylint: disable=g-import-not-at-top
    from peftjax.core.adapter import merge  # pylint: disable=g-import-not-at-top
    adapter, frozen, state, _, _ = load_adapter(path, params)
    return merge(adapter, frozen, state)
  from peftjax.io.params_file import load_params  # pylint: disable=g-import-not-at-top
  return load_params(path, params)


def graft(targets, finetuned, *, sparsity: float = 0.01, sigmoid_bias: float = 10.0,
          l1: float = 0.0) -> Adapter:
  """A grafting mask over every floating parameter that a regex of `targets` finds.

  Args:
    targets: regexes searched in slash paths (the official code grafts every parameter of
      the encoder's layers, not the embeddings or the head, e.g. `encoder/layer_\\d+/`).
    finetuned: the fine-tuned tree: a params file or adapter directory path, or a tree.
    sparsity: fraction of the targeted entries in the base patch (the official
      `sparsity_level`).
    sigmoid_bias: the bias inside the sigmoid (official default 10).
    l1: weight of ||γ||_1 in the loss.

  References:
    Panigrahi et al., "Task-Specific Skill Localization in Fine-tuned Language Models",
    ICML 2023, arXiv:2302.06600.
  """
  if finetuned is None:
    raise ValueError('graft needs the fine-tuned params: finetuned= a params file, an adapter '
                     'directory or a param tree')
  if not 0.0 <= sparsity <= 1.0:
    raise ValueError(f'graft sparsity must be in [0, 1], got {sparsity}')
  if l1 < 0:
    raise ValueError(f'graft l1 must be >= 0, got {l1}')
  source = str(finetuned) if isinstance(finetuned, (str, pathlib.Path)) else None
  config = dict(method='graft', targets=target_list(targets), finetuned=source,
                sparsity=sparsity, sigmoid_bias=sigmoid_bias, l1=l1)

  def init(rng, params, *, calib=None):
    del calib
    if GRAFT in params:
      raise ValueError(f'graft keeps the fine-tuned targets under {GRAFT!r}, a name the params '
                       'already use')
    flat = P.flatten(params)
    chosen = P.select(flat, config['targets'])
    ft_flat = P.flatten(_load_finetuned(finetuned, params))
    pre, ft = {}, {}
    for path in chosen:
      pre[path] = materialize(flat[path])
      if path not in ft_flat:
        raise ValueError(f'graft: the fine-tuned params have no {path}')
      if not jnp.issubdtype(pre[path].dtype, jnp.floating):
        raise ValueError(f'graft targets floating-point weights; {path} is {pre[path].dtype}')
      ft[path] = jnp.asarray(materialize(ft_flat[path]), pre[path].dtype)
      if ft[path].shape != pre[path].shape:
        raise ValueError(f'graft: the fine-tuned {path} is {ft[path].shape}; the params hold '
                         f'{pre[path].shape}')
    patch = base_patch(pre, ft, sparsity)
    keys = jax.random.split(rng, max(len(chosen), 1))
    state = {}
    for key, path in zip(keys, chosen):
      u = jax.random.uniform(key, pre[path].shape, jnp.float32)
      state[path] = jnp.where(jnp.asarray(patch[path] > 0), 2 * sigmoid_bias - u, u)
    return {**params, GRAFT: P.unflatten(ft)}, state

  def apply(frozen, state):
    return grafted(frozen, masks(state, sigmoid_bias))

  def loss(state):
    return l1 * sum(jnp.sum(g) for g in masks(state, sigmoid_bias).values())

  def describe(frozen, state):
    flat = P.flatten(frozen)
    return {p: {'shape': list(flat[p].shape), 'trainable': int(s.size),
                'grafted': int(jnp.sum(s > sigmoid_bias))} for p, s in state.items()}

  return Adapter(init=init, apply=apply, config=config, loss=loss if l1 > 0 else None,
                 describe=describe)


def binarized_graft(adapter: Adapter, frozen, state, *, fraction: float | None = None):
  """`(params, used)`: the tree grafting a binary mask, and the fraction of the targeted
  entries it takes from θ_ft. fraction=None rounds γ (γ > 1/2, as the official code
  evaluates); a number keeps that fraction (rounded down) of the targeted entries with the
  largest γ.

  Args:
    adapter, frozen, state: a `graft` adapter and its (trained) scores.
    fraction: None, or the share in [0, 1] of targeted entries to graft.

  Returns:
    `(params, used)`: a plain tree and the grafted fraction of the targeted entries.

  Raises:
    ValueError: not a graft adapter, or a fraction outside [0, 1].

  References:
    Panigrahi et al., "Task-Specific Skill Localization in Fine-tuned Language Models",
    ICML 2023, arXiv:2302.06600.
  """
  if adapter.config.get('method') != 'graft':
    raise ValueError(f"binarized_graft needs a graft adapter, got {adapter.config.get('method')!r}")
  scores = {p: np.asarray(s, np.float32) for p, s in state.items()}
  total = sum(s.size for s in scores.values())
  if fraction is None:
    chosen = {p: s > adapter.config['sigmoid_bias'] for p, s in scores.items()}
  else:
    if not 0.0 <= fraction <= 1.0:
      raise ValueError(f'binarized_graft fraction must be in [0, 1], got {fraction}')
    every = np.concatenate([s.ravel() for s in scores.values()])
    flags = np.zeros(every.size, bool)
    flags[np.argsort(-every, kind='stable')[:int(fraction * every.size)]] = True
    chosen, start = {}, 0
    for p, s in scores.items():
      chosen[p] = flags[start:start + s.size].reshape(s.shape)
      start += s.size
  used = sum(int(c.sum()) for c in chosen.values()) / max(total, 1)
  return grafted(frozen, {p: jnp.asarray(c) for p, c in chosen.items()}), used
