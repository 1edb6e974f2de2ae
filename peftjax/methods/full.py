"""Full (or selective) fine-tuning and the frozen linear probe, in the method contract; BitFit
and LayerNorm tuning as `full` over the params they name."""
from __future__ import annotations

import re

from peftjax.core.adapter import Adapter, combine, partition
from peftjax.methods.common import target_list

BIASES = r'(?:^|/)bias$'  # every param named `bias`
NORMS = r'(?i)norm[^/]*/(?:scale|bias)$'  # the scale and bias of every *norm* module
NORM_PARAMS = r'(?:^|/)(?:scale|bias)$'  # what a norm holds (ln_tuning's targets may select)


def full(targets=('.*',)) -> Adapter:
  """Full fine-tuning of the parameters matched by `targets` (all of them by default).

  Args:
    targets: regexes searched in slash paths.

  Returns:
    An `Adapter` whose state is `{path: array}` of the matched params (they replace the
      frozen ones in `apply`), the rest frozen.

  Example:
    >>> import jax, jax.numpy as jnp, peftjax as pj
    >>> params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.zeros(2)}}
    >>> frozen, state = pj.full('bias').init(jax.random.key(0), params)
    >>> list(state)
    ['dense/bias']
  """
  targets = [targets] if isinstance(targets, str) else list(targets)

  def init(rng, params, *, calib=None):
    del rng, calib
    state, frozen = partition(params, targets)
    return frozen, state

  def apply(frozen, state):
    return combine(state, frozen)

  return Adapter(init=init, apply=apply, config={'method': 'full', 'targets': targets},
                 unmerge=lambda merged, state: partition(merged, targets)[1])


def probe() -> Adapter:
  """Trains nothing in the model: only a task head on top of it learns (a linear probe).

  Returns:
    An `Adapter` with an empty state; the task's head (`head.kind` 'linear' or efficient
      probing's 'attentive', `peftjax.tasks.heads`) is what trains.

  Example:
    >>> import jax, jax.numpy as jnp, peftjax as pj
    >>> pj.probe().init(jax.random.key(0), {'w': jnp.ones(2)})[1]
    {}
  """
  return Adapter(init=lambda rng, params, *, calib=None: (params, {}),
                 apply=lambda frozen, state: frozen, config={'method': 'probe'},
                 unmerge=lambda merged, state: merged)


def bitfit(targets=(BIASES,)) -> Adapter:
  """BitFit: "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
  Language-models" (Ben Zaken et al., ACL 2022, arXiv:2106.10199): trains only bias terms.

  `full` over `targets`, by default every param named `bias` (the official code's `all`:
  attention, FFN and LayerNorm biases); narrower regexes give the paper's subsets (e.g.
  `('query/bias$', 'intermediate/bias$')`). A target that selects another param is an error.
  """
  return _selective('bitfit', targets, BIASES, 'bias terms')


def ln_tuning(targets=(NORMS,)) -> Adapter:
  """LayerNorm tuning: trains only the norms' scale and bias, as in "Tuning LayerNorm in
  Attention: Towards Efficient Multi-Modal LLM Finetuning" (Zhao et al., ICLR 2024,
  arXiv:2312.11420; HF PEFT's `ln_tuning`).

  `full` over `targets`, by default the `scale` and `bias` of every module whose name contains
  `norm` (any case: the bundled models' `*norm`, Flax's `LayerNorm_0` / `RMSNorm_0`). A target
  that selects a param not named `scale` or `bias` (a kernel, an embedding) is an error.
  """
  return _selective('ln_tuning', targets, NORM_PARAMS, 'norm scales and biases')


def _selective(name: str, targets, allowed: str, what: str) -> Adapter:
  """`full(targets)` recorded as method `name`, whose targets may select only params whose
  path matches `allowed`."""
  targets = target_list(targets)
  base = full(targets)

  def init(rng, params, *, calib=None):
    frozen, state = base.init(rng, params, calib=calib)
    other = [p for p in state if not re.search(allowed, p)]
    if other:
      raise ValueError(f'{name} trains {what} only, but its targets {targets} also select '
                       f'{other[:3]} (allowed: paths matching {allowed!r})')
    return frozen, state

  return base._replace(init=init, config={'method': name, 'targets': targets})
