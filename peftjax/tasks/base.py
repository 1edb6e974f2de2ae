"""The task contract: everything specific to a problem, so that one trainer runs them all.

A task owns its model (`peftjax.models.Model`, built from the config or handed in), its data
splits and batches, the trainable params it adds beside the adapter (its `head`: a
classifier, prompts, or nothing), its loss and its metrics. The trainer (`peftjax.train`)
owns the loop, sharding, checkpoints, selection and logging, and calls only what is here.

Batches are dicts of numpy arrays whose leading axis is the batch; `weights` (per row, or per
token) is what the loss averages over, so rows of weight 0 pad a batch and micro-batches are
weighted by their sum. Evaluation sums `eval_sums` over batches and divides each sum by the
summed `count`.
"""
from __future__ import annotations

import abc
from typing import Any, Iterator

import jax

from peftjax.core.calib import Calibration
from peftjax.models import Model


class Task(abc.ABC):
  """A problem the trainer can fine-tune `model` on. Subclasses set `model` and implement
  the abstract methods; `selection` names the val metric that picks the best adapter (the
  highest if `maximize`, else the lowest)."""
  model: Model
  selection: str = 'accuracy'
  maximize: bool = True
  splits: tuple[str, ...] = ('train', 'val', 'test')

  @abc.abstractmethod
  def num_batches(self, split: str, batch_size: int) -> int:
    """Batches in one pass over `split`."""

  @abc.abstractmethod
  def batches(self, split: str, batch_size: int, *, seed: int | None = None, epoch: int = 0,
              start: int = 0, rows: slice = slice(None)) -> Iterator[dict]:
    """One pass over `split` in batches of exactly `batch_size` rows: shuffled by
    `(seed, epoch)`, or in a fixed order if `seed` is None; `start` skips that many batches
    (a resumed epoch); only `rows` of each batch are built (a process's share)."""

  def batch_shapes(self, batch_size: int) -> list[dict[str, jax.ShapeDtypeStruct]]:
    """Every batch shape training can see, compiled before the clock starts (none: compiled
    on first use)."""
    return []

  def init_head(self, rng) -> Any:
    """The trainable params the task adds beside the adapter."""
    return {}

  @abc.abstractmethod
  def loss(self, params, head, batch, *, rng=None) -> jax.Array:
    """The training loss on a batch; `params` is the adapted tree (it may hold structured
    leaves: run it with `self.model.apply`); `rng` is given in training (dropout) only."""

  def predictions(self, params, head, batch, *, rng=None) -> tuple[jax.Array, jax.Array]:
    """The model's prediction logits on a batch, [..., classes] (or tokens), and the weights
    of their rows, [...]: what methods with a `Guide` compare with a reference model's."""
    raise NotImplementedError(f'{type(self).__name__} gives no predictions (logits and row '
                              'weights), which methods with a guide (e.g. mask_tuning with '
                              'gradient dropout) need')

  @abc.abstractmethod
  def eval_sums(self, params, head, batch) -> dict[str, jax.Array]:
    """Per-metric sums over the batch's rows (including `loss`), and their `count`."""

  def calibration_mask(self, batch):
    """The weights of the rows fed to the model's layers, shaped like their leading axes
    (None: every row counts); used by data-initialised methods' statistics."""
    return None

  def calibration(self, head, batches) -> Calibration:
    """Statistics of the base model for data-initialised methods (CorDA, EVA, LoRA-GA): the
    loss is the task's, with `head`, in inference mode."""
    loss = lambda params, batch: self.loss(params, head, batch)
    return Calibration(loss, self.model.params, batches, loss_fn=loss,
                       mask_fn=self.calibration_mask)
