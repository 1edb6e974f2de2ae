"""The jitted pieces of training: state, optimiser, train step and eval step.

Mixed precision: with `compute_dtype=jnp.bfloat16` the tree the model runs with is cast to
bf16 inside the step, so the trainable params, their gradients and the optimiser state stay
float32 (the master copy) while matmuls run in bf16; losses are float32.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax.core.adapter import Adapter, regularizer, transform
from peftjax.tasks.base import Task


# Folded into a step's key for a guide's `combine` (micro-batches fold in their index).
GUIDE_STREAM = 0x7FFFFFFF


class TrainState(NamedTuple):
  """Everything that changes during training. `trainable` is `{'adapter': the method's state,
  'head': the task's trainable params}`."""
  step: jax.Array
  trainable: Any
  opt_state: Any


OPTIMIZERS = ('adamw', 'sgd')


def make_optimizer(config, adapter: Adapter, total_steps: int = 0) -> optax.GradientTransformation:
  """AdamW, or with `name='sgd'` plain gradient descent (the official grafting's mask
  training), either with decoupled weight decay; constant LR, or warm-up + cosine decay to 0
  at `total_steps`. The raw gradients (adapter and head) are clipped to `clip_norm` first,
  then the method's own transform sees the adapter's, as in the reference trainers of
  LoRA-Pro and SORSA. The adapter and the head have optimiser states of their own (`Parts`),
  so that the method's can start again alone (`restart_adapter`). The head's updates are
  `head_lr_scale` (default 1) times the optimiser's: its learning rate scaled, 0 a frozen
  head."""
  lr = config.lr
  if config.schedule == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps,
                                            max(total_steps, config.warmup_steps + 1))
  elif config.schedule != 'constant':
    raise ValueError(f"optimizer.schedule {config.schedule!r}; expected 'constant' or 'cosine'")
  name = config.get('name', 'adamw')
  if name not in OPTIMIZERS:
    raise ValueError(f'optimizer.name {name!r}; expected one of {OPTIMIZERS}')
  head_scale = config.get('head_lr_scale', 1.0)
  if head_scale < 0:
    raise ValueError(f'optimizer.head_lr_scale must be >= 0 (0 freezes the head), got '
                     f'{head_scale}')

  def optimizer():
    if name == 'sgd':
      return optax.chain(optax.add_decayed_weights(config.weight_decay), optax.sgd(lr))
    return optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                       weight_decay=config.weight_decay)

  method_tx = transform(adapter, config.lr)
  on_adapter = optax.chain(*([method_tx] if method_tx is not None else []), optimizer())
  on_head = optax.chain(optimizer(), *([optax.scale(head_scale)] if head_scale != 1.0 else []))
  by_part = _by_part(on_adapter, on_head)
  return optax.chain(optax.clip_by_global_norm(config.clip_norm), by_part) if config.clip_norm \
      else by_part


class Parts(NamedTuple):
  """The optimiser states of the adapter's and the head's parts of the trainable tree."""
  adapter: Any
  head: Any


def _by_part(on_adapter: optax.GradientTransformation,
             on_head: optax.GradientTransformation) -> optax.GradientTransformation:
  """`on_adapter` on the `adapter` part of `{'adapter', 'head'}` trees, `on_head` on the
  `head` part, each with its own state (`Parts`)."""

  def init(params):
    return Parts(on_adapter.init(params['adapter']), on_head.init(params['head']))

  def update(updates, state, params=None):
    part = (lambda k: None) if params is None else params.get
    adapter, adapter_state = on_adapter.update(updates['adapter'], state.adapter, part('adapter'))
    head, head_state = on_head.update(updates['head'], state.head, part('head'))
    return {**updates, 'adapter': adapter, 'head': head}, Parts(adapter_state, head_state)

  return optax.GradientTransformation(init, update)


def restart_adapter(old, fresh):
  """The optimiser state `old` with the adapter's part started again: its moments and step
  count from `fresh` (`tx.init` of a re-selected state), its learning-rate schedule going on
  from `old`; the head's part and the rest (clipping) stay `old`'s."""
  if isinstance(fresh, Parts):
    return Parts(_schedules_kept(old.adapter, fresh.adapter), old.head)
  if isinstance(fresh, tuple) and len(fresh) == len(old):
    return _rebuilt(fresh, map(restart_adapter, old, fresh))
  return old


def _schedules_kept(old, fresh):
  """`fresh`, with the learning-rate schedules' step counts of `old`."""
  if isinstance(fresh, optax.ScaleByScheduleState):
    return old
  if isinstance(fresh, tuple) and type(old) is type(fresh) and len(fresh) == len(old):
    return _rebuilt(fresh, map(_schedules_kept, old, fresh))
  return fresh


def _rebuilt(like: tuple, items) -> tuple:
  return type(like)(*items) if hasattr(like, '_fields') else tuple(items)


def init_state(trainable, tx) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))


def cast_floats(tree, dtype):
  """`tree` with every floating array (structured leaves' too) cast to `dtype`."""
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def adapted(adapter: Adapter, frozen, state, compute_dtype=None):
  """The tree the model runs with, in the compute dtype."""
  return cast_floats(adapter.apply(frozen, state), compute_dtype)


def make_train_step(task: Task, adapter: Adapter, tx, seed: int, *,
                    accumulate: int = 1, compute_dtype=None):
  """`step(state, frozen, batch) -> (state, metrics)`; dropout keys derive from (seed, step).

  `accumulate > 1` splits the batch into that many micro-batches (rows i, i + k, ...), runs
  them one after another and sums their gradients weighted by their rows, so the update is
  the full batch's (each micro-batch draws its own dropout key) at a fraction of the memory.

  A method with a `Guide` also gets the gradient of its divergence from the reference
  model's predictions (summed over micro-batches like the loss's) and replaces the adapter's
  gradients by its `combine` of the two, before the optimiser (clipping included) sees them.
  """
  guide = adapter.guide

  def loss_fn(trainable, frozen, batch, rng):
    params = adapted(adapter, frozen, trainable['adapter'], compute_dtype)
    loss = task.loss(params, trainable['head'], batch, rng=rng)
    return loss + regularizer(adapter, trainable['adapter']), loss

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def guide_grads(trainable, frozen, batch, rng):
    """The gradient of the guide's divergence with respect to the adapter's state."""
    head = jax.lax.stop_gradient(trainable['head'])
    reference = cast_floats(guide.reference(frozen, trainable['adapter']), compute_dtype)
    ref_logits = jax.lax.stop_gradient(task.predictions(reference, head, batch, rng=rng)[0])

    def divergence(state):
      logits, weights = task.predictions(adapted(adapter, frozen, state, compute_dtype), head,
                                         batch, rng=rng)
      return guide.divergence(logits, ref_logits, weights)

    return jax.grad(divergence)(trainable['adapter'])

  def both(trainable, frozen, batch, rng):
    (_, loss), grads = grad_fn(trainable, frozen, batch, rng)
    extra = guide_grads(trainable, frozen, batch, rng) if guide is not None else None
    return loss, grads, extra

  def gradients(trainable, frozen, batch, rng):
    if accumulate == 1:
      return both(trainable, frozen, batch, rng)
    micro = jax.tree.map(lambda x: jnp.swapaxes(
        x.reshape(x.shape[0] // accumulate, accumulate, *x.shape[1:]), 0, 1), batch)
    total = jnp.sum(batch['weights'])

    def add(carry, xs):
      i, part = xs
      out = both(trainable, frozen, part, jax.random.fold_in(rng, i))
      w = jnp.sum(part['weights']) / total
      return jax.tree.map(lambda c, g: c + g * w, carry, out), None

    zeros = jax.tree.map(jnp.zeros_like, (
        jnp.zeros((), jnp.float32), trainable,
        trainable['adapter'] if guide is not None else None))
    out, _ = jax.lax.scan(add, zeros, (jnp.arange(accumulate), micro))
    return out

  def step(state: TrainState, frozen, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    loss, grads, extra = gradients(state.trainable, frozen, batch, rng)
    if guide is not None:
      key = jax.random.fold_in(rng, GUIDE_STREAM)
      grads = {**grads, 'adapter': guide.combine(key, grads['adapter'], extra)}
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
    return TrainState(state.step + 1, trainable, opt_state), metrics

  return step


def make_eval_step(task: Task, adapter: Adapter, compute_dtype=None):
  """`eval_step(trainable, frozen, batch)`: the task's metric sums on a batch."""

  def eval_step(trainable, frozen, batch):
    params = adapted(adapter, frozen, trainable['adapter'], compute_dtype)
    return task.eval_sums(params, trainable['head'], batch)

  return eval_step
