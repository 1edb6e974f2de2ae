"""Chained stages: experiments that each start where the previous one ended.

A config with `stages` (name -> a complete experiment config) and `stage_order` (their names,
in order) runs them one after another, each in `WORKDIR/NAME` with `peftjax.train.loop.train`.
A later stage's `start` says what it starts from:

- `'merged'`: the previous stage's best adapter merged into its base model, written once to
  `WORKDIR/PREV/model.safetensors`, becomes the stage's `model.init` (e.g. UL2 pretraining
  with any method, then fine-tuning with another);
- `'adapter'`: the previous stage's base (its `model.init`) and its best adapter as
  `method.init`, so the same method trains on (e.g. a UL2R LoRA stage, then a task's LoRA).
- `'reference'`: the previous stage's base again, with the previous stage's merged result as
  `method.reference` (LT-SFT: fine-tune fully, then select the entries that changed most
  and train only those from the base, `peftjax.methods.sparse`).

Every stage resumes on its own after a kill, and a finished stage (one with its
`summary.json`) is skipped, so rerunning the command continues the chain. The chain's
`summary.json` holds every stage's summary.
"""
from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
from jax.experimental import multihost_utils

from peftjax import models
from peftjax.core.adapter import merge
from peftjax.io.adapter_file import load_adapter
from peftjax.io.files import atomic_write_text
from peftjax.io.params_file import save_params

STARTS = ('merged', 'adapter', 'reference')
MERGED_FILE = 'model.safetensors'


def stage_configs(config) -> list[tuple[str, ml_collections.ConfigDict]]:
  """`(name, an unlocked copy of its config)` of every stage, in order, checked."""
  order = list(config.stage_order)
  unknown = [n for n in order if n not in config.stages]
  missing = [n for n in config.stages if n not in order]
  if unknown or missing or not order:
    raise ValueError(f'stage_order {order} must name each of the stages '
                     f'{sorted(config.stages)} once')
  out = []
  for i, name in enumerate(order):
    stage = ml_collections.ConfigDict(config.stages[name].to_dict())
    start = stage.get('start', 'merged')
    if start not in STARTS:
      raise ValueError(f'stages.{name}.start is {start!r}; expected one of {STARTS}')
    if i == 0 and stage.get('start') is not None:
      raise ValueError(f'stages.{name}.start: the first stage starts from its own config')
    out.append((name, stage))
  return out


def run_stages(config, workdir, *, halt_at: tuple[str, int] | None = None) -> dict:
  """Runs (or continues) the chain of `config` in `workdir`; returns `{stage: summary}`.
  `halt_at=(stage, step)` stops abruptly there, as a crash would (for resume tests)."""
  from peftjax.train.loop import train  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  results, previous = {}, None
  for name, stage in stage_configs(config):
    if previous is not None:
      prev_name, prev = previous
      prev_dir = workdir / prev_name
      if stage.start == 'merged':
        stage.model.init = str(merged(prev, prev_dir))
      elif stage.start == 'reference':
        stage.model.init = prev.model.get('init', '')
        stage.method.reference = str(merged(prev, prev_dir))
      else:
        stage.model.init = prev.model.get('init', '')
        stage.method.init = str(prev_dir / 'adapter')
    stage_dir = workdir / name
    done = stage_dir / 'summary.json'
    if done.exists():
      print(f'stage {name}: finished earlier, skipped ({done})', flush=True)
      results[name] = json.loads(done.read_text())
    else:
      print(f'stage {name}', flush=True)
      halt = halt_at[1] if halt_at and halt_at[0] == name else 0
      results[name] = train(stage, stage_dir, resume=True, halt_at_step=halt)
    previous = name, stage
  if jax.process_index() == 0:
    atomic_write_text(workdir / 'summary.json', json.dumps(results, indent=2))
  return results


def merged(stage, stage_dir: pathlib.Path) -> pathlib.Path:
  """The stage's best adapter merged into its base model, written once."""
  path = stage_dir / MERGED_FILE
  if not path.exists():
    base = models.build(stage.model, stage.seed).params
    adapter, frozen, state, _, _ = load_adapter(stage_dir / 'adapter', base)
    params = merge(adapter, frozen, state)
    if jax.process_index() == 0:
      save_params(path, params)
    if jax.process_count() > 1:  # the others read it next
      multihost_utils.sync_global_devices(f'merged {path}')
  return path
