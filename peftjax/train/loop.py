"""The training loop: fine-tune a sentence classifier with any method, from a config.

Per epoch: train over the shuffled train split, evaluate on val, keep the best adapter (by
val accuracy) in `WORKDIR/adapter`, checkpoint; `train.max_steps` (0: none) ends training
early, after an evaluation where it stops; `train.eval_every` (0: none) adds val evaluations
every that many steps (logged, not used for selection). `head.init` starts the task head from
the one saved with an adapter (e.g. a probe run's `WORKDIR/adapter`) instead of at random. At the end: test accuracy of the best adapter,
`summary.json`, `metrics.jsonl` and `curves.png`. `resume=True` continues from the newest
checkpoint with exactly the batches, dropout keys and optimiser state it would have had.
Data-initialised methods (CorDA, EVA, LoRA-GA) get a lazy `Calibration` on the first
`config.calibration.batches` training batches (deterministic, so a resume rebuilds it).

Scale-out: the run joins a multi-process job when `config.distributed` or the environment
asks (`peftjax.parallel.mesh.init_distributed`), builds the (data, fsdp, tensor) mesh of
`config.mesh`, shards the base weights by the model's logical axes and every adapter and
optimiser leaf like the weight it belongs to (`peftjax.parallel.sharding`), and jits the step
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

from peftjax import methods
from peftjax.core.adapter import num_params, summary
from peftjax.core.calib import Calibration
from peftjax.data import vader
from peftjax.io.adapter_file import load_adapter, load_head, save_adapter
from peftjax.io.files import atomic_write_text
from peftjax.models import Backbone, build
from peftjax.objectives.classification import cross_entropy
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
  kwargs = {k: v for k, v in config.to_dict().items() if k != 'name'}
  try:
    return methods.from_config({'method': config.name, **kwargs})
  except TypeError as e:
    raise ValueError(f'method {config.name!r}: {e}') from None


def load_data(config, tokenizer) -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
  """Token arrays and labels per split (the first `limit` rows of each if `limit` > 0)."""
  if config.name != 'vader':
    raise ValueError(f"unknown data set {config.name!r}; expected 'vader'")
  out = {}
  for name, split in vader.load_split(config.domain).items():
    n = config.limit or len(split)
    out[name] = (vader.encode(tokenizer, split.texts[:n], config.max_length), split.labels[:n])
  return out


def calibration(config, backbone: Backbone, train_data, head) -> Calibration:
  """Statistics on the first `config.calibration.batches` (default 8) training batches of
  epoch 0, for data-initialised methods (CorDA, EVA, LoRA-GA); lazy, so other methods pay
  nothing. Rows are masked by attention mask and batch weight; the loss is the classifier's
  (with the freshly initialised head) in inference mode, so the result is deterministic."""
  n = (config.get('calibration') or {}).get('batches', 8)
  tc = config.train

  def batches():
    return itertools.islice(vader.batches(*train_data, tc.batch_size, seed=config.seed, epoch=0,
                                          bucket=config.data.bucket,
                                          group_by_length=config.data.get('group_by_length', 0)),
                            n)

  def loss_fn(params, batch):
    logits = backbone.embed(params, batch) @ head['kernel'] + head['bias']
    return cross_entropy(logits, batch['labels'], batch['weights'])

  return Calibration(backbone.embed, backbone.params, batches, loss_fn=loss_fn,
                     mask_fn=lambda b: b['attention_mask'] * b['weights'][:, None])


# Config keys that may change between a run and its resumption without changing its result
# (the mesh and process layout change only the order of floating-point sums).
_RESUMABLE = {'train.halt_at_step', 'train.checkpoint_every', 'train.keep_checkpoints',
              'train.log_every'}
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


def evaluate(eval_step, trainable, frozen, data, config, sharding) -> dict:
  tokens, labels = data
  size, sums = config.train.eval_batch_size, None
  for rows in vader.batches(tokens, labels, size, bucket=config.data.bucket,
                            rows=host_rows(sharding, size),
                            group_by_length=config.data.get('group_by_length', 0)):
    out = eval_step(trainable, frozen, put_rows(rows, sharding, size))
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
  sums = jax.device_get(sums)
  return {'loss': float(sums['loss'] / sums['count']),
          'accuracy': float(sums['correct'] / sums['count'])}


def place(backbone: Backbone, frozen, trainable, tx, mesh, compute_dtype=None):
  """`(state, frozen on devices, state shardings, frozen shardings)` on `mesh`: base weights
  by the model's logical axes, adapter and optimiser leaves like their base weight. The
  frozen tree goes to the devices in the compute dtype (the host copy is left as it is)."""
  base = PS.param_specs(backbone.params, backbone.logical_axes, mesh)
  trainable = jax.device_get(trainable)
  state_sh = PS.shardings(jax.eval_shape(lambda t: S.init_state(t, tx), trainable), base, mesh)
  state = jax.jit(lambda t: S.init_state(t, tx), out_shardings=state_sh)(
      put(trainable, state_sh.trainable))
  frozen_sh = PS.shardings(frozen, base, mesh)
  frozen_dev = put(S.cast_floats(jax.device_get(frozen), compute_dtype), frozen_sh)
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


def prepare(config, backbone: Backbone, adapter, frozen, trainable, tx) -> Prepared:
  """Builds `config.mesh`, places the state and the frozen tree on it, and jits the steps
  with their in/out shardings (the train step donates the old state)."""
  tc = config.train
  mesh = mesh_from_config(config.mesh)
  accumulate = int(tc.get('accumulate', 1))
  _check_batch(tc, batch_shards(mesh), accumulate)
  dtype_name = tc.get('compute_dtype', 'float32')
  if dtype_name not in COMPUTE_DTYPES:
    raise ValueError(f'train.compute_dtype {dtype_name!r}; expected one of '
                     f'{sorted(COMPUTE_DTYPES)}')
  compute_dtype = COMPUTE_DTYPES[dtype_name]
  rep, shard = replicated(mesh), batch_sharded(mesh)
  state, frozen_dev, state_sh, frozen_sh = place(backbone, frozen, trainable, tx, mesh,
                                                 compute_dtype)
  train_step = jax.jit(
      S.make_train_step(backbone, adapter, tx, config.seed, accumulate=accumulate,
                        compute_dtype=compute_dtype),
      in_shardings=(state_sh, frozen_sh, shard), out_shardings=(state_sh, rep),
      donate_argnums=0)
  eval_step = jax.jit(S.make_eval_step(backbone, adapter, compute_dtype),
                      in_shardings=(state_sh.trainable, frozen_sh, shard), out_shardings=rep)
  return Prepared(mesh, state, frozen_dev, state_sh, shard, train_step, eval_step)


def train(config, workdir, *, resume: bool = False) -> dict:
  """Runs (or resumes) the experiment of `config` in `workdir`; returns the summary."""
  init_distributed(config.get('distributed'))
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  main = jax.process_index() == 0
  ckpt = Checkpointer(workdir / 'checkpoints', keep=config.train.keep_checkpoints)
  _prepare_workdir(workdir, config, resume, ckpt)
  metrics = MetricsLog(workdir / 'metrics.jsonl')
  tc = config.train

  backbone = build(config.model, config.data.max_length, config.seed)
  data = load_data(config.data, backbone.tokenizer)
  adapter = method_from_config(config.method)
  k_adapter, k_head = jax.random.split(jax.random.key(config.seed))
  head = S.init_head(k_head, backbone.width, int(data['train'][1].max()) + 1)
  if config.get('head', {}).get('init'):  # e.g. a probe run's adapter: train the head first
    head = load_head(config.head.init, head)
  frozen, adapter_state = adapter.init(
      k_adapter, backbone.params, calib=calibration(config, backbone, data['train'], head))
  if main:
    print(summary(adapter, frozen, adapter_state, head), flush=True)

  steps_per_epoch = vader.num_batches(len(data['train'][0]), tc.batch_size)
  total_steps = steps_per_epoch * tc.epochs
  if tc.get('max_steps'):
    total_steps = min(total_steps, tc.max_steps)
  with config.optimizer.unlocked():
    config.optimizer.total_steps = total_steps
  tx = S.make_optimizer(config.optimizer, adapter)

  run = prepare(config, backbone, adapter, frozen, {'adapter': adapter_state, 'head': head}, tx)
  mesh, state, frozen_dev, shard = run.mesh, run.state, run.frozen, run.batch_sharding
  train_step, eval_step = run.train_step, run.eval_step

  pos = {'epoch': 0, 'batch': 0, 'best_accuracy': -1.0, 'best_epoch': -1}
  best = None
  if resume and ckpt.latest_step() is not None:
    state, pos = ckpt.restore(ckpt.latest_step(), state)
    if main:
      metrics.rewind(int(state.step))
    if pos['best_epoch'] >= 0:
      _, _, best_state, best_head, _ = load_adapter(workdir / 'adapter', backbone.params)
      best = {'adapter': best_state, 'head': best_head}
    if main:
      print(f'resumed at step {int(state.step)} (epoch {pos["epoch"]}, batch {pos["batch"]})')
  elif main:
    metrics.rewind(-1)

  # Compile every padded length up front so the loop's steps/s measures training alone.
  compiled = {}
  for width in range(config.data.bucket, config.data.max_length + config.data.bucket,
                     config.data.bucket):
    spec = {k: jax.ShapeDtypeStruct((tc.batch_size, width) if k in ('input_ids',
                                    'attention_mask') else (tc.batch_size,),
                                    np.float32 if k == 'weights' else np.int32, sharding=shard)
            for k in ('input_ids', 'attention_mask', 'labels', 'weights')}
    compiled[width] = train_step.lower(state, frozen_dev, spec).compile()

  step = int(state.step)
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
    for b, rows in enumerate(vader.batches(*data['train'], tc.batch_size, seed=config.seed,
                                           epoch=epoch, start=start, bucket=config.data.bucket,
                                           rows=host_rows(shard, tc.batch_size),
                                           group_by_length=config.data.get('group_by_length', 0)),
                             start):
      if step >= total_steps:
        break
      state, out = compiled[rows['input_ids'].shape[1]](
          state, frozen_dev, put_rows(rows, shard, tc.batch_size))
      step += 1
      trained += 1
      pending.append((step, out['loss']))
      bar.update()
      if step == tc.halt_at_step:
        flush(epoch)
        bar.close()
        raise SystemExit(f'halted at step {step} (train.halt_at_step)')
      if step % tc.log_every == 0:
        flush(epoch)
      if tc.get('eval_every') and step % tc.eval_every == 0 and b + 1 < steps_per_epoch:
        flush(epoch)
        jax.block_until_ready(state)
        train_time += time.perf_counter() - tic
        val = evaluate(eval_step, state.trainable, frozen_dev, data['val'], config, shard)
        if main:
          metrics.write([{'kind': 'val', 'step': step,
                          'epoch': epoch + (b + 1) / steps_per_epoch, **val}])
        tic = time.perf_counter()
      if tc.checkpoint_every and step % tc.checkpoint_every == 0 and b + 1 < steps_per_epoch:
        flush(epoch)
        jax.block_until_ready(state)
        train_time += time.perf_counter() - tic
        save_checkpoint(epoch, b + 1)
        tic = time.perf_counter()
    flush(epoch)
    jax.block_until_ready(state)
    train_time += time.perf_counter() - tic

    val = evaluate(eval_step, state.trainable, frozen_dev, data['val'], config, shard)
    if main:
      metrics.write([{'kind': 'val', 'step': step, 'epoch': epoch + 1, **val}])
      bar.write(f"epoch {epoch + 1}/{tc.epochs}: val accuracy {val['accuracy']:.4f}, "
                f"val loss {val['loss']:.4f}")
    if val['accuracy'] > pos['best_accuracy']:
      pos |= {'best_accuracy': val['accuracy'], 'best_epoch': epoch + 1}
      best = fetch(state.trainable)
      if main:
        save_adapter(workdir / 'adapter', adapter, frozen, best['adapter'], head=best['head'],
                     base_model=backbone.model_id)
    save_checkpoint(epoch + 1, 0)
    if step >= total_steps:
      break
  bar.close()
  ckpt.close()

  best = best if best is not None else fetch(state.trainable)
  test = evaluate(eval_step, put(best, run.state_shardings.trainable), frozen_dev,
                  data['test'], config, shard)
  adapter_file = workdir / 'adapter' / 'adapter.safetensors'
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(backbone.params))
  result = {
      'method': config.method.name,
      'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
      'val_accuracy': pos['best_accuracy'], 'best_epoch': pos['best_epoch'],
      'epochs': tc.epochs, 'steps': step,
      'trainable_params': num_params(state.trainable),
      'total_params': num_params(frozen) + num_params(state.trainable),
      'train_steps_per_sec': trained / train_time if train_time else None,
      'adapter_path': str(adapter_file.absolute()),
      'adapter_bytes': adapter_file.stat().st_size if adapter_file.exists() else None,
      'base_model_bytes': base_bytes,
      'base_model': backbone.model_id,
      'devices': mesh.size,
      'mesh': dict(mesh.shape),
      'processes': jax.process_count(),
      'compute_dtype': tc.get('compute_dtype', 'float32'),
  }
  if main:
    metrics.write([{'kind': 'test', 'step': step, **test}])
    atomic_write_text(workdir / 'summary.json', json.dumps(result, indent=2))
    plot_curves(metrics.read(), workdir / 'curves.png',
                title=f"{config.method.name}: test accuracy {test['accuracy']:.4f}")
    print(f"test accuracy {test['accuracy']:.4f} (best val {pos['best_accuracy']:.4f} at "
          f"epoch {pos['best_epoch']}); summary in {workdir / 'summary.json'}")
  return result


def _check_batch(tc, shards: int, accumulate: int):
  """Batches must split evenly over the mesh's batch axes (and into micro-batches)."""
  if accumulate < 1 or tc.batch_size % (shards * accumulate):
    raise ValueError(f'train.batch_size {tc.batch_size} must be a multiple of the mesh\'s '
                     f'batch shards (data x fsdp = {shards}) times train.accumulate '
                     f'({accumulate})')
  if tc.eval_batch_size % shards:
    raise ValueError(f'train.eval_batch_size {tc.eval_batch_size} must be a multiple of the '
                     f"mesh's batch shards (data x fsdp = {shards})")
