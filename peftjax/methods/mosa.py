"""MoSA: "MoSA: Mixture of Sparse Adapters for Visual Efficient Tuning" (Zhang et al., 2023,
arXiv:2312.02923), split & merge of a bottleneck adapter (`methods.adapters`).

Split: the entries of each adapter's up-projection are divided into `modules`
non-overlapping sparse modules M_1..M_N of equal size (a uniform random partition, as the
official pruner's `divide` in mode 'all' by random scores), drawn from `seed` and the
module's path. Each module also has an up bias of its own. Sparse training: every training
call of a wrapped module activates `active` of the N modules at random, from the call's
'dropout' rng (a fresh draw per module and step, reproducible by the run's seed); the call runs
the up-projection as up ⊙ (M_S) over the active set S and the up bias as the mean of the
active modules' biases, so only their entries get gradients. Merge (`merge_mosa`): one
standard adapter with up = (active / N) · Σ_i up ⊙ M_i and the mean of the modules' biases:
the official merge (mode 'add', the mean of the N experts), i.e. the expectation of a training
call's adapter over the draw. A call without a 'dropout' rng (evaluation) runs the merged one.

As in the official code (github.com/Theia-4869/MoSA, every script's `SHARE "down"`, `BIAS
True`, `EXPERT_NUM 4`): only the up-projection is split, the down-projection and its bias are
shared and train every step, biases are not split (each module owns a whole one), and the
up-projection starts at zero, so that a module's entries outside its share are zero as in the
official experts (the single `up` of the state holds every module's share).

Deviations: `active` generalises the official one module per call (`random.randint`, the
default `active=1`); the official scripts also add a symmetric KL between two forward passes
with independent draws (`ADDITIONAL`, `REG_WEIGHT 1`), which needs a second forward per step
and is not done here; the official AdaptFormer and Pfeiffer styles normalise the adapter's
input with a LayerNorm of their own, which is not offered; the paper's hierarchical sparse
strategy is not implemented.
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.core.adapter import Adapter
from peftjax.core.bottleneck import Bottleneck, check_options
from peftjax.methods.adapters import bottleneck_adapter, check_size, insert, projections
from peftjax.methods.common import target_list


def split(seed: int, path: str, shape: tuple, modules: int) -> np.ndarray:
  """The module (0..modules-1) of each entry of an up-projection of `shape`: a uniform random
  partition into parts whose sizes differ by at most one."""
  n = int(np.prod(shape))
  order = np.random.default_rng([seed, zlib.crc32(path.encode())]).permutation(n)
  owner = np.empty(n, np.int32)
  owner[order] = np.arange(n) * modules // n
  return owner.reshape(shape)


def draw(rng, modules: int, active: int) -> jax.Array:
  """The `active` distinct modules (of `modules`) that one training call activates."""
  return jax.random.choice(rng, modules, (active,), replace=False)


@jax.tree_util.register_pytree_with_keys_class
class SparseModules(Bottleneck):
  """A `Bottleneck` whose up-projection is split into modules (`split`, the module of each
  entry) and whose up bias is one row per module (modules, out); see the module docstring."""
  children = Bottleneck.children + ('split',)
  stochastic = True

  def __init__(self, down, down_bias, up, up_bias, split, active: int = 1, *options):
    super().__init__(down, down_bias, up, up_bias, *options)
    self.split, self.active = split, int(active)

  def _aux(self):
    return (self.active, *super()._aux())

  def weights(self, rng=None):
    modules = self.up_bias.shape[0]
    if rng is None:  # the merged adapter: the expectation over the draw
      return (self.down, self.down_bias, self.up * (self.active / modules),
              jnp.mean(self.up_bias, axis=0))
    chosen = draw(rng, modules, self.active)
    mask = jnp.isin(self.split, chosen).astype(self.up.dtype)
    return self.down, self.down_bias, self.up * mask, jnp.mean(self.up_bias[chosen], axis=0)


def mosa(targets, size: int = 64, *, modules: int = 4, active: int = 1, seed: int = 0,
         placement: str = 'sequential', residual: bool = True, activation: str = 'gelu',
         scale: float = 1.0, widths: dict | None = None) -> Adapter:
  """MoSA (Zhang et al., 2023): a bottleneck adapter trained as `modules` sparse modules.

  Args:
    targets, size, placement, residual, activation, scale, widths: as
      `methods.adapters.bottleneck_adapter` (the up-projection starts at zero).
    modules: N, the number of sparse modules each up-projection is split into.
    active: how many of them a training call activates (the share active / N of the
      entries); the official code: one.
    seed: draws the split.

  Returns:
    An `Adapter` with state `{module path: {'down', 'down_bias', 'up', 'up_bias' (N, out)}}`;
      `merge_mosa` turns it into a standard adapter. No merged tree (`pj.merge` raises).

  References:
    Zhang et al., "MoSA: Mixture of Sparse Adapters for Visual Efficient Tuning", 2023,
    arXiv:2312.02923.
  """
  check_options(placement, activation)
  check_size('MoSA', size)
  if not (isinstance(modules, int) and isinstance(active, int) and 1 <= active <= modules):
    raise ValueError(f'MoSA needs integers 1 <= active <= modules, got active={active!r}, '
                     f'modules={modules!r}')
  config = dict(method='mosa', targets=target_list(targets), size=size, modules=modules,
                active=active, seed=int(seed), placement=placement, residual=bool(residual),
                activation=activation, scale=float(scale),
                widths={k: [int(n) for n in v] for k, v in (widths or {}).items()})

  def make_entry(key, path, d_in, d_out):
    if size * d_out < modules:
      raise ValueError(f'MoSA cannot split the {size} x {d_out} up-projection of {path} into '
                       f'{modules} modules')
    down, up = projections(key, d_in, size, d_out, 'zero_up', 0.0)
    return {'down': down, 'down_bias': jnp.zeros((size,), jnp.float32),
            'up': up, 'up_bias': jnp.zeros((modules, d_out), jnp.float32)}

  return insert(config, make_entry, _leaf_maker(config))


def _leaf_maker(config: dict):
  def make_leaf(path, e):
    return SparseModules(e['down'], e['down_bias'], e['up'], e['up_bias'],
                         split(config['seed'], path, e['up'].shape, config['modules']),
                         config['active'], config['placement'], config['residual'],
                         config['scale'], config['activation'])
  return make_leaf


def _standard(config: dict) -> Adapter:
  return bottleneck_adapter(config['targets'], config['size'], placement=config['placement'],
                            residual=config['residual'], activation=config['activation'],
                            scale=config['scale'], widths=config['widths'])


def _entry(down, down_bias, up, up_bias) -> dict:
  return {'down': down, 'down_bias': down_bias, 'up': up, 'up_bias': up_bias}


def merge_mosa(adapter: Adapter, state) -> tuple[Adapter, dict]:
  """`(standard adapter, its state)` of a MoSA adapter: the merged modules (module docstring),
  computing what MoSA's evaluation calls compute.

  Args:
    adapter: a `mosa` adapter.
    state: its (trained) state.

  Returns:
    A `bottleneck_adapter` with MoSA's placement and sizes, and its state: run, save and
      load it as any bottleneck adapter (the frozen tree is unchanged).

  References:
    Zhang et al., "MoSA: Mixture of Sparse Adapters for Visual Efficient Tuning", 2023,
    arXiv:2312.02923.
  """
  config = _check(adapter)
  make_leaf = _leaf_maker(config)
  return _standard(config), {path: _entry(*make_leaf(path, e).weights())
                             for path, e in state.items()}


def sparse_modules(adapter: Adapter, state) -> list[tuple[Adapter, dict]]:
  """The N sparse modules of a MoSA adapter, each as `(standard adapter, its state)`: what a
  training call with that module alone active computes (up ⊙ M_i, the module's own bias)."""
  config = _check(adapter)
  out = []
  for i in range(config['modules']):
    parts = {}
    for path, e in state.items():
      mask = split(config['seed'], path, e['up'].shape, config['modules']) == i
      parts[path] = _entry(e['down'], e['down_bias'], e['up'] * mask, e['up_bias'][i])
    out.append((_standard(config), parts))
  return out


def _check(adapter: Adapter) -> dict:
  if adapter.config.get('method') != 'mosa':
    raise ValueError(f"expected a MoSA adapter, got method {adapter.config.get('method')!r}")
  return adapter.config
