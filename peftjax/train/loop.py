"""The training loop: fine-tune any task's model with any method, from a config.

The task (`peftjax.tasks`, named by `config.task` or handed in) owns the model, data, head,
loss and metrics; this loop owns the rest. Per epoch: train over the shuffled train split,
evaluate on val, keep the best adapter (by the task's `selection` metric on val) in
`WORKDIR/adapter`, checkpoint; `train.max_steps` (0: none) ends training early, after an
evaluation where it stops; `train.eval_every` (0: none) adds val evaluations every that many
steps (logged, not used for selection), `train.eval_at_start` one before the first step.
`head.init` starts the task head from the one saved with an adapter (e.g. a probe run's
`WORKDIR/adapter`) instead of at random. At the end: the
test metrics of the best adapter, `summary.json`, `metrics.jsonl` and `curves.png`.
`resume=True` continues from the newest checkpoint with exactly the batches, dropout keys and
optimiser state it would have had. Data-initialised methods (CorDA, EVA, LoRA-GA, SPT) get a lazy
`Calibration` on the first `config.calibration.batches` training batches (deterministic, so
a resume rebuilds it). A method with a `Reselection` (SaRA's progressive schedule) selects
again after its fraction of the steps: the adapter there is saved in `WORKDIR/reselected`
(a resumed run selects again from it), the method's optimiser state starts again, and
adapter files hold the state in init's selection. `evaluate_adapter` measures a saved
adapter on any split.

Scale-out: the run joins a multi-process job when `config.distributed` or the environment
asks (`peftjax.parallel.mesh.init_distributed`), builds the (data, fsdp, tensor) mesh of
`config.mesh`, shards the base weights by the model's logical axes and every adapter and
optimiser leaf like the weight it belongs to (`peftjax.parallel.sharding`; a model without
logical axes is replicated, with a warning where the mesh would shard it), and jits the step
with those in/out shardings, donating the old state. Each process builds and transfers only
the batch rows of its own devices; only process 0 writes metrics, adapters and summaries, while
checkpoints are written by all (orbax). `train.accumulate` micro-batches per step,
`train.compute_dtype` ('float32' or 'bfloat16': float32 master weights and optimiser) and
`model.remat` trade speed for memory. A non-finite loss stops the run before anything is
saved over the last good checkpoint.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import pathlib
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding

from peftjax import methods, tasks
from peftjax.core import paths as P
from peftjax.core.adapter import frozen_params, num_params, summary
from peftjax.io import hf_peft
from peftjax.io.adapter_file import fitting_head, load_adapter, load_head, save_adapter
from peftjax.io.files import atomic_write_text
from peftjax.models import Model
from peftjax.parallel import sharding as PS
from peftjax.parallel.mesh import (batch_sharded, batch_shards, fetch, host_rows,
                                   init_distributed, mesh_from_config, put, put_rows,
                                   replicated)
from peftjax.train import step as S
from peftjax.train.checkpoint import Checkpointer
from peftjax.train.metrics import MetricsLog, plot_curves

log = logging.getLogger(__name__)


def method_from_config(config) -> methods.Adapter:
  """The method of `config.method` (`name` plus that method's keyword arguments)."""
  kwargs = {k: v for k, v in config.to_dict().items() if k not in ('name', 'init')}
  try:
    return methods.from_config({'method': config.name, **kwargs})
  except TypeError as e:
    raise ValueError(f'method {config.name!r}: {e}; the config\'s method keys may belong to '
                     'another method: pick the method with the config\'s argument, e.g. '
                     f'--config=configs/minilm_vader.py:{config.name}') from None


RESELECTED = 'reselected'  # the adapter where the method selected again (resumes start there)

# Config keys that may change between a run and its resumption without changing its result
# (the mesh and process layout change only the order of floating-point sums).
_RESUMABLE = {'train.checkpoint_every', 'train.keep_checkpoints', 'train.log_every'}
_RESUMABLE_PREFIXES = ('mesh.', 'distributed.')
COMPUTE_DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}


def _prepare_workdir(workdir: pathlib.Path, config, resume: bool, ckpt: Checkpointer):
  saved = workdir / 'config.json'
  current = json.loads(config.to_json_best_effort())
  if ckpt.latest_step() is not None and not resume:
    raise FileExistsError(f'{workdir} already holds a run (checkpoint step '
                          f'{ckpt.latest_step()}): pass --resume, or use a new --workdir')
  if resume and saved.exists():
    before = json.loads(saved.read_text())
    changed = sorted(k for k in set(_flat(before)) | set(_flat(current))
                     if _flat(before).get(k) != _flat(current).get(k) and k not in _RESUMABLE
                     and not k.startswith(_RESUMABLE_PREFIXES))
    if changed:
      raise ValueError(f'--resume with a different config than {saved}: {", ".join(changed)}')
  if jax.process_index() == 0:
    atomic_write_text(saved, json.dumps(current, indent=2))


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    out |= _flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v}
  return out


def evaluate(task, eval_step, trainable, frozen, split: str, batch_size: int,
             sharding) -> dict:
  """The task's metrics on `split`: each summed metric over the summed `count`."""
  sums = None
  for rows in task.batches(split, batch_size, rows=host_rows(sharding, batch_size)):
    out = eval_step(trainable, frozen, put_rows(rows, sharding, batch_size))
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
  sums = jax.device_get(sums)
  names = sorted((k for k in sums if k != 'count'), key=lambda k: (k != 'loss', k))
  return {k: float(sums[k] / sums['count']) for k in names}


def place(model: Model, frozen, trainable, tx, mesh, compute_dtype=None):
  """`(state, frozen on devices, state shardings, frozen shardings)` on `mesh`: base weights
  by the model's logical axes, adapter and optimiser leaves like their base weight. The
  frozen tree goes to the devices in the compute dtype (the host copy is left as it is)."""
  base = PS.param_specs(model.params, model.logical_axes, mesh)
  trainable = jax.device_get(trainable)
  state_sh = PS.shardings(jax.eval_shape(lambda t: S.init_state(t, tx), trainable), base, mesh)
  state = jax.jit(lambda t: S.init_state(t, tx), out_shardings=state_sh)(
      put(trainable, state_sh.trainable))
  frozen_sh = PS.shardings(frozen, base, mesh)
  frozen_dev = put(S.cast_floats(frozen, compute_dtype), frozen_sh)
  return state, frozen_dev, state_sh, frozen_sh


class Prepared(NamedTuple):
  """A run's mesh, its placed state and frozen tree, and its jitted steps."""
  mesh: Mesh
  state: S.TrainState
  frozen: Any
  state_shardings: Any
  batch_sharding: NamedSharding
  train_step: Callable
  eval_step: Callable


def prepare(config, task, adapter, frozen, trainable, tx) -> Prepared:
  """Builds `config.mesh`, places the state and the frozen tree on it, and jits the steps
  with their in/out shardings (the train step donates the old state)."""
  tc = config.train
  mesh = mesh_from_config(config.mesh)
  accumulate = int(tc.accumulate)
  _check_batch(tc, batch_shards(mesh), accumulate)
  dtype_name = tc.compute_dtype
  if dtype_name not in COMPUTE_DTYPES:
    raise ValueError(f'train.compute_dtype {dtype_name!r}; expected one of '
                     f'{sorted(COMPUTE_DTYPES)}')
  compute_dtype = COMPUTE_DTYPES[dtype_name]
  rep, shard = replicated(mesh), batch_sharded(mesh)
  state, frozen_dev, state_sh, frozen_sh = place(task.model, frozen, trainable, tx, mesh,
                                                 compute_dtype)
  train_step = jax.jit(
      S.make_train_step(task, adapter, tx, config.seed, accumulate=accumulate,
                        compute_dtype=compute_dtype),
      in_shardings=(state_sh, frozen_sh, shard), out_shardings=(state_sh, rep),
      donate_argnums=0)
  eval_step = jax.jit(S.make_eval_step(task, adapter, compute_dtype),
                      in_shardings=(state_sh.trainable, frozen_sh, shard), out_shardings=rep)
  return Prepared(mesh, state, frozen_dev, state_sh, shard, train_step, eval_step)


def train(config, workdir, *, resume: bool = False, task=None, halt_at_step: int = 0) -> dict:
  """Runs (or resumes) the experiment of `config` in `workdir`; returns the summary.

  `task`: a `peftjax.tasks.Task` (e.g. on a model of your own); default: `config.task`'s,
  built from the config. `halt_at_step` stops the run abruptly there, as a crash would (for
  resume tests)."""
  init_distributed(config.distributed)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  main = jax.process_index() == 0
  ckpt = Checkpointer(workdir / 'checkpoints', keep=config.train.keep_checkpoints)
  _prepare_workdir(workdir, config, resume, ckpt)
  metrics = MetricsLog(workdir / 'metrics.jsonl')
  tc = config.train

  task = task or tasks.build(config)
  model = task.model
  adapter = method_from_config(config.method)
  k_adapter, k_head = jax.random.split(jax.random.key(config.seed))
  head = task.init_head(k_head)
  if config.head.init:  # e.g. a probe run's adapter: train the head first
    head = load_head(config.head.init, head)
  if config.method.get('init'):  # e.g. a previous stage's adapter: train it further
    adapter, frozen, adapter_state, saved_head = _saved_adapter(config.method.init, adapter,
                                                                model.params)
    if saved_head is not None and not config.head.init:  # an imported classifier
      head = fitting_head(P.flatten(saved_head), head, config.method.init)
  else:
    calib = task.calibration(head, lambda: itertools.islice(
        task.batches('train', tc.batch_size, seed=config.seed, epoch=0),
        config.calibration.batches))
    frozen, adapter_state = adapter.init(k_adapter, model.params, calib=calib)
  if main:
    print(summary(adapter, frozen, adapter_state, head), flush=True)

  steps_per_epoch = task.num_batches('train', tc.batch_size)
  total_steps = steps_per_epoch * tc.epochs
  if tc.max_steps:
    total_steps = min(total_steps, tc.max_steps)
  tx = S.make_optimizer(config.optimizer, adapter, total_steps)
  reselection = adapter.reselection
  reselect_at = round(reselection.at * total_steps) if reselection else 0
  frozen_now = frozen  # the frozen tree of the current selection: init's until re-selected

  def select_again(trainable, opt_state, step):
    """The run placed again with the method's new selection of `trainable` (host arrays)."""
    nonlocal frozen_now
    frozen_now, again = reselection.reselect(frozen, trainable['adapter'])
    new = prepare(config, task, adapter, frozen_now, {**trainable, 'adapter': again}, tx)
    opt_state = S.restart_adapter(opt_state, fetch(new.state.opt_state))
    sh = new.state_shardings
    return new._replace(state=S.TrainState(put(np.int32(step), sh.step), new.state.trainable,
                                           put(opt_state, sh.opt_state)))

  def in_init_selection(trainable, selected):
    """`trainable` of the selection whose frozen tree is `selected`, as the state of init's
    selection (what adapter files hold)."""
    if selected is frozen:
      return trainable
    return {**trainable, 'adapter': reselection.restate(frozen, selected, trainable['adapter'])}

  run = prepare(config, task, adapter, frozen, {'adapter': adapter_state, 'head': head}, tx)
  mesh, state, shard = run.mesh, run.state, run.batch_sharding
  selection = task.selection

  def val_metrics():
    return evaluate(task, run.eval_step, state.trainable, run.frozen, 'val', tc.eval_batch_size,
                    shard)

  sign = 1.0 if task.maximize else -1.0  # best_metric is stored as sign * metric
  pos = {'epoch': 0, 'batch': 0, 'best_metric': -math.inf, 'best_epoch': -1}
  best = best_frozen = None  # the best trainable tree, and the frozen tree of its selection
  if resume and ckpt.latest_step() is not None:
    if reselect_at and ckpt.latest_step() >= reselect_at:  # saved after the re-selection
      _, _, at_reselect, saved_head, _ = load_adapter(workdir / RESELECTED, model.params)
      opt_state = fetch(state.opt_state)
      state = run = None
      run = select_again({'adapter': at_reselect, 'head': saved_head or {}}, opt_state,
                         reselect_at)
    state, pos = ckpt.restore(ckpt.latest_step(), run.state)
    if 'best_accuracy' in pos:  # written before tasks named their selection metric
      pos['best_metric'] = pos.pop('best_accuracy')
    if main:
      metrics.rewind(int(state.step))
    if pos['best_epoch'] >= 0:
      _, _, best_state, best_head, _ = load_adapter(workdir / 'adapter', model.params)
      best, best_frozen = {'adapter': best_state, 'head': best_head}, frozen
    if main:
      print(f'resumed at step {int(state.step)} (epoch {pos["epoch"]}, batch {pos["batch"]})')
  elif main:
    metrics.rewind(-1)

  def compile_steps():
    """The train step compiled for the task's batch shapes up front, so that the loop's
    steps/s measures training alone."""
    specs = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shard) for k, v in s.items()}
             for s in task.batch_shapes(tc.batch_size))
    return {_shapes(s): run.train_step.lower(state, run.frozen, s).compile() for s in specs}

  compiled = compile_steps()

  step = int(state.step)
  if tc.get('eval_at_start') and step == 0:  # the starting point, e.g. a pretrained model's
    val = val_metrics()
    if main:
      metrics.write([{'kind': 'val', 'step': 0, 'epoch': 0, **val}])
      print('before training: val ' + ', '.join(f'{k} {v:.4f}' for k, v in val.items()))
  pending, train_time, trained = [], 0.0, 0
  bar = tqdm.tqdm(total=total_steps, initial=step, unit='step', disable=not main,
                  mininterval=0.5 if sys.stderr.isatty() else 30, dynamic_ncols=True)

  def flush(epoch):
    records = [{'kind': 'train', 'step': s, 'epoch': epoch, 'loss': float(l)}
               for s, l in zip(*zip(*pending))] if pending else []
    if records and main:
      metrics.write(records)
      bar.set_postfix(loss=f"{np.mean([r['loss'] for r in records]):.4f}", refresh=False)
    pending.clear()
    bad = next((r for r in records if not math.isfinite(r['loss'])), None)
    if bad is not None:  # Stop before anything is saved from the broken state.
      bar.close()
      ckpt.close()
      raise FloatingPointError(
          f"training loss is {bad['loss']} at step {bad['step']}; stopped without saving. "
          f"The last good checkpoint (step {ckpt.latest_step()}) is kept in {ckpt.directory}. "
          'Lower optimizer.lr or set optimizer.clip_norm and run again in a new --workdir.')

  def save_checkpoint(epoch, batch):
    ckpt.save(step, state, {**pos, 'epoch': epoch, 'batch': batch})

  for epoch in range(pos['epoch'], tc.epochs):
    start = pos['batch'] if epoch == pos['epoch'] else 0
    tic = time.perf_counter()
    for b, rows in enumerate(task.batches('train', tc.batch_size, seed=config.seed,
                                          epoch=epoch, start=start,
                                          rows=host_rows(shard, tc.batch_size)), start):
      if step >= total_steps:
        break
      batch = put_rows(rows, shard, tc.batch_size)
      state, out = compiled.get(_shapes(batch), run.train_step)(state, run.frozen, batch)
      step += 1
      trained += 1
      pending.append((step, out['loss']))
      bar.update()
      if step == halt_at_step:
        flush(epoch)
        bar.close()
        raise SystemExit(f'halted at step {step} (halt_at_step)')
      if step == reselect_at:  # before anything is saved at this step
        flush(epoch)
        train_time += time.perf_counter() - tic
        trainable, opt_state = fetch((state.trainable, state.opt_state))
        if main:  # what a resumed run selects again from
          save_adapter(workdir / RESELECTED, adapter, frozen, trainable['adapter'],
                       head=trainable['head'], base_model=model.model_id)
        state = run = None  # the old selection leaves the devices first
        run = select_again(trainable, opt_state, step)
        state = run.state
        compiled = compile_steps()
        tic = time.perf_counter()
      if step % tc.log_every == 0:
        flush(epoch)
      mid_epoch = b + 1 < steps_per_epoch and step < total_steps  # else evaluated below
      if tc.eval_every and step % tc.eval_every == 0 and mid_epoch:
        flush(epoch)
        jax.block_until_ready(state)
        train_time += time.perf_counter() - tic
        val = val_metrics()
        if main:
          metrics.write([{'kind': 'val', 'step': step,
                          'epoch': epoch + (b + 1) / steps_per_epoch, **val}])
        tic = time.perf_counter()
      if tc.checkpoint_every and step % tc.checkpoint_every == 0 and mid_epoch:
        flush(epoch)
        jax.block_until_ready(state)
        train_time += time.perf_counter() - tic
        save_checkpoint(epoch, b + 1)
        tic = time.perf_counter()
    flush(epoch)
    jax.block_until_ready(state)
    train_time += time.perf_counter() - tic

    val = val_metrics()
    if main:
      metrics.write([{'kind': 'val', 'step': step, 'epoch': epoch + 1, **val}])
      bar.write(f'epoch {epoch + 1}/{tc.epochs}: val ' +
                ', '.join(f'{k} {v:.4f}' for k, v in val.items()))
    if sign * val[selection] > pos['best_metric']:
      pos |= {'best_metric': sign * val[selection], 'best_epoch': epoch + 1}
      best, best_frozen = fetch(state.trainable), frozen_now
      if main:
        save_adapter(workdir / 'adapter', adapter, frozen,
                     in_init_selection(best, best_frozen)['adapter'], head=best['head'],
                     base_model=model.model_id)
    save_checkpoint(epoch + 1, 0)
    if step >= total_steps:
      break
  bar.close()
  ckpt.close()

  if best is None:
    best, best_frozen = fetch(state.trainable), frozen_now
  if best_frozen is not frozen_now:  # the best came before the re-selection
    state = run = None
    run = prepare(config, task, adapter, best_frozen, best, tx)
  test = evaluate(task, run.eval_step, put(best, run.state_shardings.trainable), run.frozen,
                  'test', tc.eval_batch_size, shard)
  trainable_params = num_params(in_init_selection(best, best_frozen))
  adapter_file = workdir / 'adapter' / 'adapter.safetensors'
  result = {
      'task': config.task, 'method': config.method.name,
      **{f'test_{k}': v for k, v in test.items()},
      f'val_{selection}': sign * pos['best_metric'], 'best_epoch': pos['best_epoch'],
      'epochs': tc.epochs, 'steps': step,
      'trainable_params': trainable_params,
      'total_params': frozen_params(frozen) + trainable_params,
      'train_steps_per_sec': trained / train_time if train_time else None,
      'adapter_path': str(adapter_file.absolute()),
      'adapter_bytes': adapter_file.stat().st_size if adapter_file.exists() else None,
      'base_model_bytes': sum(x.nbytes for x in jax.tree.leaves(model.params)),
      'base_model': model.model_id,
      'devices': mesh.size,
      'mesh': dict(mesh.shape),
      'processes': jax.process_count(),
      'compute_dtype': tc.compute_dtype,
  }
  if main:
    metrics.write([{'kind': 'test', 'step': step, **test}])
    atomic_write_text(workdir / 'summary.json', json.dumps(result, indent=2))
    plot_curves(metrics.read(), workdir / 'curves.png',
                title=f"{config.method.name}: test {selection} {test[selection]:.4f}")
    print(f"test {selection} {test[selection]:.4f} (best val {sign * pos['best_metric']:.4f} at "
          f"epoch {pos['best_epoch']}); summary in {workdir / 'summary.json'}")
  return result


def evaluate_adapter(config, adapter_dir, splits=('test',), *, task=None,
                     head_from=None) -> dict:
  """The task's metrics of the adapter saved in `adapter_dir` on each of `splits`, with the
  data, mesh and compute dtype of `config` (e.g. a run's `config.json` with another
  `data.domain`): `{split: metrics}`. `adapter_dir=None` measures the config's model as it
  is (a pretrained model's held-out loss), with the task head saved in the adapter directory
  `head_from` (e.g. a merged model's own head), or a random one."""
  init_distributed(config.distributed)
  task = task or tasks.build(config)
  if adapter_dir is None:
    adapter = methods.probe()
    frozen, state = adapter.init(jax.random.key(config.seed), task.model.params)
    head = task.init_head(jax.random.key(config.seed))
    if head_from is not None:
      head = load_head(head_from, head)
  else:
    adapter, frozen, state, head, _ = hf_peft.load_any(adapter_dir, task.model.params)
    like = task.init_head(jax.random.key(config.seed))
    if head is None and like:
      raise ValueError(f'the adapter in {adapter_dir} has no task head (an HF PEFT adapter '
                       'without modules_to_save); this task needs one')
  tx = S.make_optimizer(config.optimizer, adapter, 1)
  run = prepare(config, task, adapter, frozen, {'adapter': state, 'head': head}, tx)
  return {split: evaluate(task, run.eval_step, run.state.trainable, run.frozen, split,
                          config.train.eval_batch_size, run.batch_sharding)
          for split in splits}


def _saved_adapter(directory, adapter, params):
  """`(adapter, frozen, state, head)` of the adapter saved in `directory`: `adapter`'s method,
  or an HF PEFT LoRA adapter, which trains on as the `lora` it imports as (its targets, ranks,
  alphas and dropout; the config's method must be lora or rslora). `head`: an imported
  classifier (`modules_to_save`), else None."""
  if hf_peft.is_hf_adapter(directory):
    if adapter.config['method'] != 'lora':
      raise ValueError(f'method.init: {directory} holds an HF PEFT LoRA adapter, which '
                       f'continues as lora; the config asks for {adapter.config["method"]}')
    imported, frozen, state, head, _ = hf_peft.import_adapter(directory, params)
    return imported, frozen, state, head
  saved, frozen, state, _, _ = load_adapter(directory, params)
  if saved.config != adapter.config:
    raise ValueError(f'method.init: the adapter in {directory} is {saved.config}, but the '
                     f'config asks for {adapter.config}')
  return adapter, frozen, state, None


def _shapes(batch) -> tuple:
  return tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))


def _check_batch(tc, shards: int, accumulate: int):
  """Batches must split evenly over the mesh's batch axes (and into micro-batches)."""
  if accumulate < 1 or tc.batch_size % (shards * accumulate):
    raise ValueError(f'train.batch_size {tc.batch_size} must be a multiple of the mesh\'s '
                     f'batch shards (data x fsdp = {shards}) times train.accumulate '
                     f'({accumulate})')
  if tc.eval_batch_size % shards:
    raise ValueError(f'train.eval_batch_size {tc.eval_batch_size} must be a multiple of the '
                     f"mesh's batch shards (data x fsdp = {shards})")
