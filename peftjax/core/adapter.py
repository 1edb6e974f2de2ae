"""The method contract: a NamedTuple of pure functions over a Flax param tree.

A method's `init(rng, params, *, calib=None)` returns `(frozen, state)`: the frozen tree the
model keeps (possibly re-based, e.g. a PiSSA residual) and the small trainable state. Its
`apply(frozen, state)` returns the tree the model runs with. Only `state` is differentiated.
By convention a state is a dict keyed by the slash path of the parameter it adapts.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax.core import paths as P
from peftjax.core.bottleneck import Inserted
from peftjax.core.leaves import SparseDelta, is_structured, materialize


class Codec(NamedTuple):
  """How adapter files store a method's state when not as its arrays (e.g. binary masks
  bit-packed). `encode(state)` is a tree of arrays; `decode(stored, template)` is the state,
  shaped like `template` (what `init` returns), of a tree shaped like `encode(template)`."""
  encode: Callable[[Any], Any]
  decode: Callable[[Any, Any], Any]


class Guide(NamedTuple):
  """Steers a method by how the adapted model's predictions depart from a reference model's.

  Besides the gradient g of the training loss, the train step takes the gradient h, with
  respect to the state, of `divergence(logits, reference_logits, weights)`: the task's
  `predictions` on the batch of the adapted tree `apply(frozen, state)` and, held fixed, of
  `reference(frozen, state)` (same dropout key). The optimiser receives `combine(key, g, h)`
  in place of g (before clipping); `key` derives from the run's seed and step.
  """
  reference: Callable[[Any, Any], Any]
  divergence: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
  combine: Callable[[jax.Array, Any, Any], Any]


class Reselection(NamedTuple):
  """Selects again what a method trains, partway through a run (SaRA's progressive schedule).

  After `round(at * total_steps)` steps the trainer replaces `(frozen, state)` by
  `reselect(frozen, state)` (same merged model, other entries trained), starts the method's
  optimiser state again (moments and step count; the learning-rate schedule and the head's
  optimiser go on) and trains on. Adapter files hold the state of `init`'s selection:
  `restate(frozen, frozen_now, state_now)`, with `init`'s frozen tree, is the state giving the
  model of the current `(frozen_now, state_now)`.
  """
  at: float
  reselect: Callable[[Any, Any], tuple[Any, Any]]
  restate: Callable[[Any, Any, Any], Any]


class Adapter(NamedTuple):
  """A fine-tuning method: pure functions over a Flax param tree and the JSON that rebuilds it.

  Only `init`, `apply` and `config` are required; the rest default to None (not used). The
  trainer, `summary`, `merge`, `chain`, `save_adapter` / `load_adapter` and the sharding of
  state and optimiser leaves work for any method that follows this contract.

  Attributes:
    init: `init(rng, params, *, calib=None) -> (frozen, state)`. `frozen` is the tree the
      model keeps (`params`, or re-based: e.g. PiSSA's residual, `SparseDelta` leaves);
      `state` is the trainable tree, by convention a dict keyed by the slash path of the
      param each entry adapts. `calib` is a `Calibration` (data-initialised methods).
    apply: `apply(frozen, state) -> params`: the tree the model runs with; only `state` is
      differentiated. Return a structured leaf (`LowRank`, `SparseDelta`, `Scaled`) where it
      saves compute, a plain array otherwise.
    config: JSON-able `{'method': NAME, **kwargs}`; `from_config(config)` rebuilds the method
      (its name must be in `REGISTRY`), and adapter files store it.
    loss: `loss(state) -> scalar`: a regulariser added to the training loss (e.g. SORSA's
      orthonormality); see `regularizer`.
    tx: an optax transform of the state's gradients, run after clipping and before the
      optimiser, or `tx(peak_lr) -> transform` (e.g. LoRA-Pro); see `transform`.
    unmerge: `unmerge(merged, state) -> frozen`, where the method is invertible; see `unmerge`.
    describe: `describe(frozen, state) -> {path: {'shape': [...], 'trainable': n, ...}}`:
      per-target rows for `summary` and adapter files (extra keys become columns, e.g. rank).
    codec: a `Codec` storing the state in files in another form (mask tuning's bit-packed
      masks); None: its arrays as they are.
    guide: a `Guide`: a second gradient from the gap between the adapted model's predictions
      and a reference model's (mask tuning's gradient dropout).
    reselection: a `Reselection`: what trains is selected again partway through a run.

  Example:
    A new method: a learned offset added to each targeted kernel (invertible, so it unmerges).

    >>> import jax, jax.numpy as jnp
    >>> import peftjax as pj
    >>> def offset(targets):
    ...   def init(rng, params, *, calib=None):
    ...     flat = pj.flatten(params)
    ...     return params, {p: jnp.zeros_like(flat[p]) for p in pj.select(flat, targets)}
    ...   def apply(frozen, state):
    ...     flat = pj.flatten(frozen)
    ...     return pj.unflatten({**flat, **{p: flat[p] + d for p, d in state.items()}})
    ...   def unmerge(merged, state):
    ...     return apply(merged, {p: -d for p, d in state.items()})
    ...   return pj.Adapter(init, apply, {'method': 'offset', 'targets': targets},
    ...                     unmerge=unmerge)
    >>> params = {'query': {'kernel': jnp.ones((4, 4))}, 'out': {'kernel': jnp.ones((4, 2))}}
    >>> adapter = offset(['query/kernel'])
    >>> frozen, state = adapter.init(jax.random.key(0), params)
    >>> sorted(state)
    ['query/kernel']
    >>> pj.merge(adapter, frozen, state)['query']['kernel'].shape
    (4, 4)

    Register it in `peftjax.methods.REGISTRY` so that configs (`method.name`) and
    `load_adapter` find it by name.
  """
  init: Callable[..., tuple[Any, Any]]
  apply: Callable[[Any, Any], Any]
  config: dict
  loss: Callable[[Any], jax.Array] | None = None
  # An optax transform of the state's gradients, run after clipping and before the optimiser;
  # or a function of the optimiser's peak learning rate returning one (see `transform`).
  tx: optax.GradientTransformation | Callable[[float], optax.GradientTransformation] | None = None
  unmerge: Callable[[Any, Any], Any] | None = None
  describe: Callable[[Any, Any], dict] | None = None
  codec: Codec | None = None  # the state in adapter files (None: its arrays as they are)
  guide: Guide | None = None  # a second gradient from the reference model's predictions
  reselection: Reselection | None = None  # selected again partway through a run


class NotMergeableError(TypeError):
  """A method whose tree inserts modules into the model (`core.bottleneck`): no tree of the
  model's own weights computes what it does."""


def merge(adapter: Adapter, frozen, state):
  """A plain Flax tree (no structured leaves) equal to what the model runs with.

  Args:
    adapter: the method.
    frozen, state: what `adapter.init` returned (the state trained or not).

  Returns:
    `materialize(adapter.apply(frozen, state))`: plain arrays, nothing of peftjax inside.

  Raises:
    NotMergeableError: the method inserts modules (bottleneck adapters, MoSA), which no
      weight of the model can hold.

  Example:
    >>> import jax, jax.numpy as jnp, peftjax as pj
    >>> params = {'dense': {'kernel': jnp.ones((4, 4))}}
    >>> adapter = pj.lora('dense/kernel', rank=2)
    >>> frozen, state = adapter.init(jax.random.key(0), params)
    >>> type(pj.merge(adapter, frozen, state)['dense']['kernel']).__name__
    'ArrayImpl'
  """
  params = adapter.apply(frozen, state)
  modules = inserted_modules(params)
  if modules:
    raise NotMergeableError(
        f"method {adapter.config.get('method')!r} inserts modules into the model (at "
        f"{', '.join(modules[:3])}{' ...' if len(modules) > 3 else ''}) that no weight of the "
        'model can hold, so it has no merged tree; run adapter.apply(frozen, state) inside '
        'pj.structured_layers() (as the trainer does)')
  return materialize(params)


def inserted_modules(tree) -> list[str]:
  """The paths of the modules that `tree` inserts around its modules' calls."""
  return [P.SEP.join(p.split(P.SEP)[:-1]) for p, leaf in P.flatten(tree).items()
          if isinstance(leaf, Inserted)]


def unmerge(adapter: Adapter, merged, state):
  """Recovers the frozen tree from a merged one, where the method is invertible.

  Args:
    adapter: the method that merged it.
    merged: `merge(adapter, frozen, state)` (or a tree of the same structure).
    state: the state it was merged with.

  Returns:
    The frozen tree (up to float rounding).

  Raises:
    NotImplementedError: the method has no `unmerge` (e.g. `full`, which replaces weights).

  Example:
    >>> import jax, jax.numpy as jnp, peftjax as pj
    >>> params = {'dense': {'kernel': jnp.ones((4, 4))}}
    >>> adapter = pj.lora('dense/kernel', rank=2)
    >>> frozen, state = adapter.init(jax.random.key(0), params)
    >>> back = pj.unmerge(adapter, pj.merge(adapter, frozen, state), state)
    >>> bool(jnp.allclose(back['dense']['kernel'], 1.0))
    True
  """
  if adapter.unmerge is None:
    raise NotImplementedError(f"method {adapter.config.get('method')!r} cannot be unmerged")
  return adapter.unmerge(merged, state)


def regularizer(adapter: Adapter, state) -> jax.Array:
  """The method's loss term, `adapter.loss(state)`, added to the training loss.

  Returns:
    A float32 scalar; 0 if the method has no `loss`.
  """
  return adapter.loss(state) if adapter.loss is not None else jnp.zeros((), jnp.float32)


def transform(adapter: Adapter, lr: float) -> optax.GradientTransformation | None:
  """The method's gradient transform for an optimiser whose peak learning rate is `lr`.

  Returns:
    `adapter.tx(lr)` if `tx` is a function of the learning rate, else `adapter.tx` (an optax
      transform, or None: no transform). The trainer chains it after gradient clipping and
      before the optimiser.
  """
  return adapter.tx(lr) if callable(adapter.tx) else adapter.tx


def is_entry(x, keys) -> bool:
  """A target's state entry: a dict with exactly `keys`, none hidden by optax's masking (as
  in the trees a transform inside `optax.multi_transform`, e.g. a chain's, receives)."""
  return (isinstance(x, dict) and set(x) == set(keys)
          and not any(isinstance(v, optax.MaskedNode) for v in x.values()))


def partition(tree, patterns) -> tuple[dict[str, Any], dict]:
  """Splits `tree` by target patterns.

  Args:
    tree: a nested param tree.
    patterns: a regex or regexes searched in slash paths.

  Returns:
    `(selected, rest)`: `{path: leaf}` of the leaves a pattern matches, and the other leaves
      as a nested tree. `combine(selected, rest)` is `tree` again.

  Raises:
    PatternError: a pattern matches no path.

  Example:
    >>> import peftjax as pj
    >>> chosen, rest = pj.partition({'a': {'kernel': 1, 'bias': 2}}, 'kernel')
    >>> chosen, rest
    ({'a/kernel': 1}, {'a': {'bias': 2}})
  """
  flat = P.flatten(tree)
  chosen = set(P.select(flat, patterns))
  return ({p: v for p, v in flat.items() if p in chosen},
          P.unflatten({p: v for p, v in flat.items() if p not in chosen}))


def combine(selected: dict[str, Any], rest) -> dict:
  """Inverse of `partition`: the nested tree of `rest` with the `{path: leaf}` of `selected`.

  Example:
    >>> import peftjax as pj
    >>> pj.combine({'a/kernel': 1}, {'a': {'bias': 2}})
    {'a': {'bias': 2, 'kernel': 1}}
  """
  return P.unflatten({**P.flatten(rest), **selected})


def num_params(tree) -> int:
  """The number of entries of every array in `tree` (e.g. a state's trainable parameters).

  Example:
    >>> import numpy as np, peftjax as pj
    >>> pj.num_params({'a': np.zeros((3, 4)), 'b': np.zeros(5)})
    17
  """
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def frozen_params(frozen) -> int:
  """The parameters of a frozen tree: a `SparseDelta` counts its base weight (its indices
  and placeholder values are the selection, whose values the state holds)."""
  return num_params(jax.tree.map(lambda x: x.w if isinstance(x, SparseDelta) else x, frozen,
                                 is_leaf=is_structured))


def chain(*adapters: Adapter) -> Adapter:
  """Applies methods in order: `apply_n(... apply_1(frozen, s_1) ..., s_n)`.

  Only the first method may re-base the frozen tree; later ones adapt the output of the
  earlier ones. The chain's losses add up, its transforms apply to each method's own state
  (`optax.multi_transform`), it unmerges where every method does, and at most one method may
  have a `guide`.

  Args:
    *adapters: the methods, in the order they apply.

  Returns:
    An `Adapter` whose state is a tuple with one entry per method and whose config is
      `{'method': 'chain', 'adapters': [each config]}`.

  Raises:
    ValueError: no method given, more than one guided method, or a method that selects again
      partway through a run (`Reselection`); at `init`, a method after the first re-based
      the frozen tree.

  Example:
    >>> import jax, jax.numpy as jnp, peftjax as pj
    >>> params = {'q': {'kernel': jnp.ones((4, 4))}, 'v': {'kernel': jnp.ones((4, 4))}}
    >>> both = pj.chain(pj.lora('q/kernel', rank=2), pj.full('v/kernel'))
    >>> frozen, states = both.init(jax.random.key(0), params)
    >>> len(states), both.config['method']
    (2, 'chain')
  """
  if not adapters:
    raise ValueError('chain needs at least one method')
  reselecting = [a.config.get('method') for a in adapters if a.reselection is not None]
  if reselecting:
    raise ValueError(f'a chain cannot select again partway through a run; {reselecting} would '
                     '(train it alone, or without its progressive schedule)')

  def init(rng, params, *, calib=None):
    rngs = jax.random.split(rng, len(adapters))
    frozen, state = adapters[0].init(rngs[0], params, calib=calib)
    states, current = [state], adapters[0].apply(frozen, state)
    for adapter, key in zip(adapters[1:], rngs[1:]):
      base, state = adapter.init(key, current, calib=calib)
      flat = P.flatten(current)
      if any(flat.get(p) is not leaf for p, leaf in P.flatten(base).items()):
        raise ValueError(f"only the first method of a chain may re-base the frozen tree; "
                         f"{adapter.config.get('method')!r} did")
      states.append(state)
      current = adapter.apply(current, state)
    return frozen, tuple(states)

  def apply(frozen, states):
    params = frozen
    for adapter, state in zip(adapters, states):
      params = adapter.apply(params, state)
    return params

  def loss(states):
    return sum(regularizer(a, s) for a, s in zip(adapters, states))

  def unmerge_all(merged, states):
    for i, (adapter, state) in reversed(list(enumerate(zip(adapters, states)))):
      paths = set(P.flatten(merged))
      merged = unmerge(adapter, merged, state)
      lost = paths - set(P.flatten(merged))
      if i and lost:  # e.g. `full`: the values it replaced are not in the merged tree
        raise NotImplementedError(
            f"cannot unmerge the chain: method {i} ({adapter.config.get('method')!r}) cannot "
            f"restore what it replaced: {sorted(lost)[:3]}")
    return merged

  def describe(frozen, states):
    out, params = {}, frozen
    for i, (adapter, state) in enumerate(zip(adapters, states)):
      for path, info in describe_targets(adapter, params, state).items():
        out[f'{i}{P.SEP}{path}'] = info
      params = adapter.apply(params, state)
    return out

  def tx(lr):
    return optax.multi_transform(
        {str(i): transform(a, lr) or optax.identity() for i, a in enumerate(adapters)},
        lambda states: tuple(jax.tree.map(lambda _, i=i: str(i), s) for i, s in enumerate(states)))

  codec = Codec(
      encode=lambda states: tuple(a.codec.encode(s) if a.codec else s
                                  for a, s in zip(adapters, states)),
      decode=lambda stored, templates: tuple(
          a.codec.decode(s, t) if a.codec else s
          for a, s, t in zip(adapters, stored, templates)))
  return Adapter(
      init=init, apply=apply,
      config={'method': 'chain', 'adapters': [a.config for a in adapters]},
      loss=loss if any(a.loss for a in adapters) else None,
      tx=tx if any(a.tx is not None for a in adapters) else None,
      unmerge=unmerge_all if all(a.unmerge for a in adapters) else None,
      describe=describe,
      codec=codec if any(a.codec for a in adapters) else None,
      guide=_chain_guide(adapters))


def _chain_guide(adapters) -> Guide | None:
  """A chain's guide: its one guided method's, the others' gradients passing unchanged; the
  reference runs the guided method's reference in place of its `apply`."""
  guided = [i for i, a in enumerate(adapters) if a.guide is not None]
  if not guided:
    return None
  if len(guided) > 1:
    names = [adapters[i].config.get('method') for i in guided]
    raise ValueError(f'a chain may hold one guided method (its gradients are steered by one '
                     f'reference model), got {names}')
  (k,) = guided
  guide = adapters[k].guide

  def reference(frozen, states):
    params = frozen
    for i, (adapter, state) in enumerate(zip(adapters, states)):
      params = (guide.reference if i == k else adapter.apply)(params, state)
    return params

  def combine(key, grads, guide_grads):
    return tuple(guide.combine(key, g, h) if i == k else g
                 for i, (g, h) in enumerate(zip(grads, guide_grads)))

  return Guide(reference=reference, divergence=guide.divergence, combine=combine)


def describe_targets(adapter: Adapter, frozen, state) -> dict[str, dict]:
  """Per adapted parameter: its shape and the trainable parameters the method gives it."""
  if adapter.describe is not None:
    return adapter.describe(frozen, state)
  flat = P.flatten(frozen)
  return {path: {'shape': list(flat[path].shape) if path in flat else list(np.shape(s)),
                 'trainable': num_params(s)}
          for path, s in state.items()}


def summary(adapter: Adapter, frozen, state, head=None, max_rows: int = 48) -> str:
  """A table of adapted parameters and the trainable / total parameter counts.

  Args:
    adapter, frozen, state: a method and what its `init` returned.
    head: the task's trainable params beside the adapter, counted as trainable.
    max_rows: targets listed before the table says how many more there are.

  Returns:
    The table as text: one row per target (shape, trainable count and the method's
      `describe` columns, e.g. rank), then `trainable params: N || all params: M ||
      trainable%: P`.

  Example:
    >>> import jax, jax.numpy as jnp, peftjax as pj
    >>> adapter = pj.lora('kernel', rank=2)
    >>> frozen, state = adapter.init(jax.random.key(0), {'dense': {'kernel': jnp.ones((4, 4))}})
    >>> print(pj.summary(adapter, frozen, state).splitlines()[-1])
    trainable params: 16 || all params: 32 || trainable%: 50.0000
  """
  rows = describe_targets(adapter, frozen, state)
  extra_keys = sorted({k for info in rows.values() for k in info} - {'shape', 'trainable'})
  width = max([len(p) for p in rows] + [len('target')])
  header = f"{'target':<{width}}  {'shape':>12}  {'trainable':>10}" + ''.join(
      f'  {k:>8}' for k in extra_keys)
  lines = [f"method: {adapter.config.get('method')}", header, '-' * len(header)]
  shown = dict(list(rows.items())[:max_rows])
  for path, info in shown.items():
    lines.append(f"{path:<{width}}  {'x'.join(map(str, info['shape'])):>12}  "
                 f"{info['trainable']:>10,}" + ''.join(
                     f'  {_fmt(info.get(k, "")):>8}' for k in extra_keys))
  if len(rows) > max_rows:
    lines.append(f'... and {len(rows) - max_rows} more')
  trainable = num_params(state) + num_params(head or {})
  total = frozen_params(frozen) + trainable
  lines.append(f'trainable params: {trainable:,} || all params: {total:,} || '
               f'trainable%: {100 * trainable / max(total, 1):.4f}')
  return '\n'.join(lines)


def _fmt(v):
  return f'{v:g}' if isinstance(v, float) else str(v)
