"""SSF and (IA)³: learned per-feature scales (and shifts) that fold into the adapted weights.

SSF: "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning" (Lian et
al., NeurIPS 2022, arXiv:2210.08823). After each targeted linear or norm op, y' = γ ⊙ y + β
with per-output-feature γ and β, trained alone. Re-parameterised into the op itself, as the
paper merges it: a kernel W (in, out) with bias b runs as W·diag(γ), γ ⊙ b + β; a norm's
scale s and bias b as γ ⊙ s, γ ⊙ b + β. So `merge` gives a plain model with no extra ops.

(IA)³: "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (Liu et al., NeurIPS 2022, arXiv:2205.05638). Learned vectors l_k, l_v rescale the
keys and values (the output features of W_k, W_v, their bias included: l ⊙ (x W + b)), and
l_ff the FFN's intermediate activations, i.e. the input features (rows) of the down
projection: (l_ff ⊙ h) W_down = h (diag(l_ff) W_down). Initialised to 1; merged exactly.

Both are pure transforms of the param tree: `apply` returns each adapted kernel as a
`leaves.Scaled` leaf, which dense layers compute as `(x @ W) * γ` or `(x * l) @ W` (no
full-size weight gradient: 0.82x the step time of forming W·diag(γ) in the loss for SSF on
MiniLM, `python -m experiments.bench_scale_shift`), and the biases and norm scales as plain
vectors.

Kernels are (in, out), as in `flax.linen.Dense`. A target is a 2-D kernel or, for SSF, a
norm's 1-D `scale`; its shift lives in the sibling `bias`, so an SSF target without a bias is
an error (the merged tree could not hold β), as is a kernel of another rank (a convolution,
a multi-axis `DenseGeneral`).

Deviations from the official code:
- SSF (dongzelian/SSF) draws γ ~ N(1, 0.02), β ~ N(0, 0.02); `init='identity'` (the default)
  starts at γ = 1, β = 0 exactly, so the adapted model equals the pretrained one at step 0 (the
  contract every method here keeps); `init='normal'` is the official draw. The official code
  places SSF after every linear and norm of its models; here the targets choose.
- (IA)³ in t-few scales the outputs of T5's W_k, W_v and `wi_1` (the linear half of the gated
  FFN, whose product with the gate is the input of W_down); a BERT FFN has no gate, so here,
  as in the paper's equations and HF PEFT's `feedforward_modules`, l_ff scales W_down's rows.
  HF PEFT's BERT default also scales the input of the attention output projection (its
  `output.dense` suffix matches both); the defaults of `configs/minilm_vader.py` do not.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from peftjax.core import paths as P
from peftjax.core.adapter import Adapter
from peftjax.core.leaves import Scaled
from peftjax.methods.common import target_list

SSF_INITS = ('identity', 'normal')
SSF_STD = 0.02  # the official init's standard deviation of γ and β
BIAS = 'bias'


def _sibling(path: str, name: str) -> str:
  parent, _, _ = path.rpartition(P.SEP)
  return f'{parent}{P.SEP}{name}' if parent else name


def _select(method: str, flat: dict, targets, *, norms: bool) -> list[str]:
  """The paths `targets` select among the params not named `bias` (every pattern must match
  one); each must be a 2-D kernel, or (with `norms`) a norm's 1-D `scale`."""
  chosen = P.select([p for p in flat if p.rpartition(P.SEP)[2] != BIAS], targets,
                    what='kernel' + (' or norm scale' if norms else ''))
  for path in chosen:
    ndim, is_scale = flat[path].ndim, path.rpartition(P.SEP)[2] == 'scale'
    if ndim != 2 and not (norms and ndim == 1 and is_scale):
      raise ValueError(
          f'{method} target {path} has shape {tuple(flat[path].shape)}: {method} rescales 2-D '
          f'kernels (in, out){" and 1-D norm scales" if norms else ""}; a convolution or '
          'multi-axis DenseGeneral kernel is not supported: leave it out of the targets')
  return chosen


def _check_bias(method: str, flat: dict, path: str, *, required: bool):
  """The bias beside the target `path` must be (out,) (and, if `required`, exist)."""
  bias, d = flat.get(_sibling(path, BIAS)), flat[path].shape[-1]
  if bias is None and not required:
    return
  if bias is None or tuple(bias.shape) != (d,):
    found = 'none' if bias is None else f'shape {tuple(bias.shape)}'
    raise ValueError(
        f'{method} target {path} needs a bias {_sibling(path, BIAS)} of shape ({d},)'
        + (' to hold the shift β, so that the merged tree stays a plain model' if required
           else ' (its output features)')
        + f'; found {found}: leave it out of the targets')


def _rescaled(frozen, state):
  """`frozen` with each target of `state` rescaled: entry `scale` (and `shift`) on its output
  features and bias, `input_scale` on its input features (rows)."""
  flat = P.flatten(frozen)
  for path, entry in state.items():
    w = flat[path]
    if 'input_scale' in entry:
      flat[path] = Scaled(w, entry['input_scale'], 0)
      continue
    scale = entry['scale']
    flat[path] = Scaled(w, scale, 1) if w.ndim == 2 else w * scale.astype(w.dtype)
    bias = _sibling(path, BIAS)
    if bias in flat:
      shift = entry.get('shift')
      flat[bias] = flat[bias] * scale.astype(flat[bias].dtype) + (
          0 if shift is None else shift.astype(flat[bias].dtype))
  return P.unflatten(flat)


def _restored(merged, state):
  """Inverse of `_rescaled` on a merged (plain) tree."""
  flat = P.flatten(merged)
  for path, entry in state.items():
    if 'input_scale' in entry:
      flat[path] = flat[path] / entry['input_scale'][:, None]
      continue
    scale = entry['scale']
    flat[path] = flat[path] / scale
    bias = _sibling(path, BIAS)
    if bias in flat:
      flat[bias] = (flat[bias] - entry.get('shift', 0)) / scale
  return P.unflatten(flat)


def ssf(targets, *, init: str = 'identity') -> Adapter:
  """SSF: a trained per-output-feature scale γ and shift β after each targeted op.

  Args:
    targets: regexes searched in slash paths of kernels (in, out) and norm scales, e.g.
      `('encoder/.*/kernel', 'norm/scale$')`; each needs a sibling `bias` of shape (out,).
    init: 'identity' (γ = 1, β = 0: the pretrained model at step 0) or 'normal' (the official
      code's γ ~ N(1, 0.02), β ~ N(0, 0.02)).

  Returns:
    An `Adapter` whose state is `{path: {'scale': γ, 'shift': β}}` (2 * out per target).

  Raises:
    PatternError: a pattern that matches no kernel or norm scale.
    ValueError: a target that is not a 2-D kernel or 1-D norm scale, or has no bias of
      shape (out,) to hold β.

  Example:
    >>> adapter = ssf(['attention/(query|key|value|output)/kernel', 'norm/scale$'])

  References:
    Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model
    Tuning" (SSF), NeurIPS 2022, arXiv:2210.08823.
  """
  if init not in SSF_INITS:
    raise ValueError(f'unknown SSF init {init!r}; expected one of {SSF_INITS}')
  config = {'method': 'ssf', 'targets': target_list(targets), 'init': init}

  def init_fn(rng, params, *, calib=None):
    del calib
    flat = P.flatten(params)
    chosen = _select('SSF', flat, config['targets'], norms=True)
    state = {}
    for key, path in zip(jax.random.split(rng, max(len(chosen), 1)), chosen):
      w, d = flat[path], flat[path].shape[-1]
      _check_bias('SSF', flat, path, required=True)
      if init == 'identity':
        scale, shift = jnp.ones((d,), w.dtype), jnp.zeros((d,), w.dtype)
      else:
        k1, k2 = jax.random.split(key)
        scale = 1.0 + SSF_STD * jax.random.normal(k1, (d,), w.dtype)
        shift = SSF_STD * jax.random.normal(k2, (d,), w.dtype)
      state[path] = {'scale': scale, 'shift': shift}
    return params, state

  return Adapter(init=init_fn, apply=_rescaled, config=config, unmerge=_restored)


def ia3(targets, feedforward=()) -> Adapter:
  """(IA)³: learned vectors, initialised to 1, rescaling the outputs of the kernels that
  `targets` select (keys, values: their columns and bias) and the inputs of those that
  `feedforward` selects (the FFN activations: the rows of the down projection).

  Args:
    targets: regexes of the kernels (in, out) whose output features are rescaled, e.g.
      `attention/(key|value)/kernel$`.
    feedforward: regexes of the kernels whose input features are rescaled, e.g.
      `layer_\\d+/output/kernel$` (the bundled BERT's FFN down projection).

  Returns:
    An `Adapter` whose state is `{path: {'scale': l}}` (out per target) and
      `{path: {'input_scale': l}}` (in per feedforward kernel).

  Raises:
    PatternError: a pattern that matches no kernel.
    ValueError: a selected param that is not a 2-D kernel, a kernel both patterns select, or
      a bias beside a target that is not of shape (out,).

  Example:
    >>> adapter = ia3('attention/(key|value)/kernel$', r'layer_\\d+/output/kernel$')

  References:
    Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
    In-Context Learning" ((IA)³), NeurIPS 2022, arXiv:2205.05638.
  """
  config = {'method': 'ia3', 'targets': target_list(targets),
            'feedforward': target_list(feedforward)}
  if not config['targets'] and not config['feedforward']:
    raise ValueError('(IA)³ needs targets or feedforward patterns; got neither')

  def init_fn(rng, params, *, calib=None):
    del rng, calib
    flat = P.flatten(params)
    outputs = _select('(IA)³', flat, config['targets'], norms=False)
    inputs = _select('(IA)³', flat, config['feedforward'], norms=False)
    both = sorted(set(outputs) & set(inputs))
    if both:
      raise ValueError(f'(IA)³: {both[:3]} selected by both targets (output scales) and '
                       'feedforward (input scales); each kernel takes one')
    for path in outputs:
      _check_bias('(IA)³', flat, path, required=False)
    state = {p: {'scale': jnp.ones((flat[p].shape[1],), flat[p].dtype)} for p in outputs}
    state |= {p: {'input_scale': jnp.ones((flat[p].shape[0],), flat[p].dtype)} for p in inputs}
    return params, state

  return Adapter(init=init_fn, apply=_rescaled, config=config, unmerge=_restored)
