"""Orbax checkpoints of the train state plus JSON metadata (data position, best epoch).

Orbax finalises a step by renaming its temp folder, so a killed write never leaves a step
that looks complete; `restore` turns an unreadable step into a clear error.
"""
from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that exists but cannot be restored."""


class Checkpointer:
  """Keeps the newest `keep` steps of `(state, meta)` under `directory`."""

  def __init__(self, directory, keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict):
    """Saves step `step`, replacing a step of that number saved before (a run stopped
    between its last checkpoint and its end, resumed: the same state, a later position)."""
    if step in self._manager.all_steps():
      self._manager.delete(step)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, like):
    """Restores `(state, meta)`; `like` gives the structure, shapes and shardings."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      raise CheckpointError(
          f'checkpoint step {step} in {self.directory} cannot be restored '
          f'({type(e).__name__}: {str(e).splitlines()[0][:300]}); move that step folder away '
          f'to resume from an older one, or start in a new workdir') from None
    return out.state, out.meta

  def close(self):
    self._manager.close()
