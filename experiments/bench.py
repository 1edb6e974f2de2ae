"""Train-step time and peak memory of LoRA vs full fine-tuning (and the probe), MiniLM or LM.

  python -m experiments.bench [--model minilm|tiny|smollm2|tiny-llama] [--methods lora,full]
                              [--seq_len N] [--steps 20] [--rounds 2] [--json PATH]
                              [--no-torch] [--torch_python PATH] [--config MODULE] [--layers N]

MiniLM (`minilm`, or `tiny`: a random 2-layer BERT): each method comes from its experiment
config (`configs/minilm_vader_<method>.py`), on a batch of `batch_size x seq_len` random
token ids with a full attention mask. Language models (`smollm2`: SmolLM2-135M; `tiny-llama`:
a random 2-layer Llama): every method from one LM config (`--config`, default
`configs/ul2r_smollm2_lora.py`: LoRA as configured, `full` with the config's optimiser), on a
`batch_size x row length` prefix-LM batch of the config's task (random tokens, one segment
per row, the first half the prefix), reported in tokens/s too; `--layers N` keeps the first N
decoder layers (quick checks).

Every peftjax run goes through the trainer's own `prepare` (the sharded, donating jitted
step of a real run), same method, optimiser, seed and batch size as the config. Every
configuration runs in its own subprocess, so that its peak RSS is its own: the child
compiles, warms up, then times `--steps` steps, each to `block_until_ready`. Rounds
interleave the configurations (lora, full, probe, lora, ...) so that machine noise hits all
alike; the report gives the median over rounds of each round's median step time.

Memory, two measures per configuration: the step memory of the compiled train step (XLA's
memory analysis: arguments + outputs + temporaries - outputs aliased to donated arguments,
per device), what an accelerator allocates for the step (weights, optimiser state, batch,
activations, gradients); and the process's peak RSS, which on CPU adds the runtime, the
compiler's heap, host copies of the params and freed memory the allocator keeps. On a GPU or
TPU the device's own `peak_bytes_in_use` is reported as well.

Where `torch`, `transformers` and `peft` are installed (in this interpreter or in
`--torch_python`), the same steps also run in HF transformers + HF PEFT on the same weights
(`experiments.bench_torch`): LoRA on the HF modules that the config's targets select, AdamW
with the config's settings; for a language model our params are exported once per command to
an HF `LlamaForCausalLM` checkpoint whose logits must match ours before timing. torch is
never required.

A method may carry variants after `@`, joined by `+`: `lora@bf16` (train.compute_dtype
bfloat16), `lora@remat` (model.remat), `lora@bf16+remat`; these rows have no torch twin.
This file measures; `peftjax.benchmark` loads the configs, plans the torch twin and reports.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from experiments.bench_torch import (BATCH_FILE, NUM_CLASSES, REFERENCE_FILE, RESULT_MARK,
                                     make_batch, timed)
from peftjax.benchmark import (JAX, LM_CONFIG, TORCH, first_layers, is_lm, lm_row_length,
                               load_config, ratios, report, summarize, torch_plan)

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPORT = 'export'  # the job that writes a language model's torch twin
REFERENCE_TOKENS = 16
_CHILD_TIMEOUT_S = 3600


def config_module(method: str) -> str:
  """The config module of a method name: `lora` -> `configs.minilm_vader_lora`, or, for a
  method without a config file of its own, `configs.minilm_vader:NAME`."""
  if '.' in method:
    return method
  own = ROOT / 'configs' / f'minilm_vader_{method}.py'
  return f'configs.minilm_vader_{method}' if own.exists() else f'configs.minilm_vader:{method}'


def lm_batch(task, batch_size: int, seed: int = 0) -> dict:
  """The task's prefix-LM batch of `batch_size` rows, each one example that fills the row:
  random tokens in [0, vocab), the first half of the row the inputs (prefix)."""
  rng = np.random.default_rng(seed)
  length, vocab = task.rows['length'], task.model.module.config.vocab_size
  half = length // 2
  return task.pack([(rng.integers(0, vocab, half, dtype=np.int32),
                     rng.integers(0, vocab, length - half, dtype=np.int32))
                    for _ in range(batch_size)])


# The children: one configuration each.


def _setup(spec: dict):
  """(config, model, task, numpy batch) of a peftjax child."""
  from peftjax.models import build  # pylint: disable=g-import-not-at-top
  from peftjax.tasks.classification import SentenceClassification  # pylint: disable=g-import-not-at-top
  from peftjax.tasks.lm import CausalLM  # pylint: disable=g-import-not-at-top
  config = load_config(spec['config'], spec['model'], spec.get('variant', ''),
                       spec.get('method', ''))
  model = first_layers(build(config.model, config.seed), spec.get('layers', 0))
  size = config.train.batch_size
  if is_lm(spec['model']):  # CausalLM packs (inputs, targets) into prefix-LM rows, as UL2's.
    task = CausalLM(model, {'train': np.zeros((1, spec['seq_len']), np.int32)}, bos_id=0)
    return config, model, task, lm_batch(task, size)
  task = SentenceClassification(model, {}, num_classes=NUM_CLASSES)
  return config, model, task, make_batch(size, spec['seq_len'],
                                         model.module.config.vocab_size)


def step_memory(compiled) -> dict[str, int]:
  """XLA's memory analysis of a compiled step, bytes per device: `arguments`, `outputs`,
  `temporaries`, `aliased` (outputs written into donated arguments) and `total` = arguments +
  outputs + temporaries - aliased, what a device allocates to run the step."""
  m = compiled.memory_analysis()
  out = {'arguments': m.argument_size_in_bytes, 'outputs': m.output_size_in_bytes,
         'temporaries': m.temp_size_in_bytes, 'aliased': m.alias_size_in_bytes}
  out['total'] = out['arguments'] + out['outputs'] + out['temporaries'] - out['aliased']
  return out


def measure_jax(spec: dict) -> dict:
  """Times the trainer's train step for the config module `spec['config']`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  from peftjax.core.adapter import num_params  # pylint: disable=g-import-not-at-top
  from peftjax.parallel import mesh as M  # pylint: disable=g-import-not-at-top
  from peftjax.train import step as S  # pylint: disable=g-import-not-at-top
  from peftjax.train.loop import method_from_config, prepare  # pylint: disable=g-import-not-at-top

  tic = time.perf_counter()
  config, model, task, batch = _setup(spec)
  adapter = method_from_config(config.method)
  k_adapter, k_head = jax.random.split(jax.random.key(config.seed))
  frozen, adapter_state = adapter.init(k_adapter, model.params)
  head = task.init_head(k_head)
  tx = S.make_optimizer(config.optimizer, adapter, spec['warmup'] + spec['steps'])

  run = prepare(config, task, adapter, frozen, {'adapter': adapter_state, 'head': head}, tx)
  state, frozen = run.state, run.frozen
  shape = list(batch['input_ids'].shape)
  batch = M.put(batch, run.batch_sharding)
  setup_s = time.perf_counter() - tic

  tic = time.perf_counter()
  compiled = run.train_step.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - tic

  def step():
    nonlocal state
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    return metrics['loss']

  measured = timed(step, spec)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}  # None on CPU
  peak = stats.get('peak_bytes_in_use')
  return {
      'framework': JAX, 'method': config.method.name,
      'trainable_params': num_params(state.trainable), 'batch_shape': shape,
      **measured, 'setup_s': setup_s, 'compile_s': compile_s,
      'step_memory': step_memory(compiled),
      'device_peak_gb': None if peak is None else peak / 1e9,
      'info': {'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
               'backend': jax.default_backend(), 'device': str(device),
               'device_kind': device.device_kind, 'devices': jax.device_count(),
               'mesh_devices': run.mesh.size},
  }


def export_llama_twin(model, batch: dict, directory) -> pathlib.Path:
  """Writes the torch twin of a `Llama` model into `directory`: the HF checkpoint of its
  params, the batch the twin times, and our (causal) logits on the first
  `REFERENCE_TOKENS` tokens of its first row, which the twin must reproduce."""
  import jax  # pylint: disable=g-import-not-at-top
  from peftjax.models import hf_llama  # pylint: disable=g-import-not-at-top
  directory = hf_llama.save(model.module.config, model.params, directory)
  ids = batch['input_ids'][:1, :REFERENCE_TOKENS]
  logits = jax.jit(lambda p, x: model.apply(p, x))(model.params, ids)
  np.savez(directory / REFERENCE_FILE, input_ids=ids, logits=np.asarray(logits, np.float32))
  np.savez(directory / BATCH_FILE, **{k: batch[k] for k in ('input_ids', 'targets', 'weights')})
  return directory


def measure(spec: dict) -> dict:
  """Measures one configuration (run it in a fresh process for a meaningful peak RSS), or
  exports a language model's torch twin (`framework` 'export')."""
  if spec['framework'] == EXPORT:
    _, model, _, batch = _setup(spec)
    return {'name': spec['name'], 'path': str(export_llama_twin(model, batch, spec['path']))}
  return {'name': spec['name'], **measure_jax(spec)}


# The parent: plan, run the children, report.


def torch_available(python: str) -> bool:
  """Whether `python` imports torch, transformers and peft."""
  code = ('import importlib.util as u, sys; '
          'sys.exit(any(u.find_spec(m) is None for m in ("torch", "transformers", "peft")))')
  return subprocess.run([python, '-c', code], capture_output=True, check=False).returncode == 0


def describe_method(config) -> str:
  m = {k: v for k, v in config.method.to_dict().items() if k not in ('name', 'init')}
  args = ', '.join(f'{k}={list(v) if isinstance(v, tuple) else v}' for k, v in m.items())
  o = config.optimizer
  extras = [f'{config.train.compute_dtype} compute'] if config.train.get(
      'compute_dtype', 'float32') != 'float32' else []
  extras += ['remat per block'] if config.model.get('remat') else []
  extras += [f'clip norm {o.clip_norm:g}'] if o.get('clip_norm') else []
  return (f'{config.method.name}({args}); AdamW lr {o.lr:g}, wd {o.weight_decay:g}, '
          f'{o.get("schedule", "constant")}' + ''.join(f'; {e}' for e in extras))


def plan(args) -> tuple[dict[str, dict], dict[str, str]]:
  """Child specs by run name (peftjax ones first), and a description of each method."""
  specs, described, torch_specs = {}, {}, {}
  lm = is_lm(args.model)
  common = {'model': args.model, 'steps': args.steps, 'warmup': args.warmup,
            'layers': args.layers}
  for method in args.methods:
    base, _, variant = method.partition('@')
    module = args.config if lm else config_module(base)
    config = load_config(module, args.model, variant, base if lm else '')
    seq_len = args.seq_len or (lm_row_length(config) if lm else 64)
    described[method] = describe_method(config)
    specs[method] = {'name': method, 'framework': JAX, 'config': module, 'variant': variant,
                     'method': base if lm else '', 'seq_len': seq_len, **common}
    if args.torch and not variant:
      hf = torch_plan(config, args.model, args.layers)
      if hf is None:
        print(f'note: no torch counterpart for {method}', file=sys.stderr)
        continue
      torch_specs[f'torch-{method}'] = {
          'name': f'torch-{method}', 'framework': TORCH, 'method': method, 'hf': hf,
          'kind': 'llama' if lm else 'bert', 'seed': config.seed,
          'batch_size': config.train.batch_size, 'seq_len': seq_len,
          'optimizer': {k: config.optimizer.get(k) for k in
                        ('lr', 'weight_decay', 'b1', 'b2', 'eps', 'clip_norm', 'schedule',
                         'warmup_steps')},
          'threads': args.torch_threads, **common}
  return {**specs, **torch_specs}, described


def run_child(spec: dict, torch_python: str = sys.executable) -> dict:
  """Runs one configuration in a fresh interpreter (`torch_python` for the torch twin);
  returns its result or an `error`."""
  if spec['framework'] == TORCH:
    cmd = [torch_python, '-m', 'experiments.bench_torch', json.dumps(spec)]
  else:
    cmd = [sys.executable, '-m', 'experiments.bench', '--one', json.dumps(spec)]
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT), env.get('PYTHONPATH')]))
  try:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=_CHILD_TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired:
    return {'name': spec['name'], 'error': f'timed out after {_CHILD_TIMEOUT_S} s'}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_MARK):
      return json.loads(line[len(RESULT_MARK):])
  tail = '\n'.join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
  return {'name': spec['name'], 'error': f'exit {proc.returncode}: {tail}'}


def export_twin(specs: dict, directory: str) -> str | None:
  """For a language model with torch runs: exports the twin into `directory` once and points
  the torch specs there; returns the export's error, if any."""
  twins = [s for s in specs.values() if s['framework'] == TORCH and s['kind'] == 'llama']
  if not twins:
    return None
  job = {**next(s for s in specs.values() if s['framework'] == JAX), 'name': EXPORT,
         'framework': EXPORT, 'path': directory}
  res = run_child(job)
  for s in twins:
    s['hf'] = {**s['hf'], 'path': directory}
  return res.get('error')


def environment(summary: dict, args) -> dict:
  jax_info = next((s['info'] for s in summary.values()
                   if s.get('framework') == JAX and 'info' in s), None)
  torch_info = next((s['info'] for s in summary.values()
                     if s.get('framework') == TORCH and 'info' in s), None)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  env = {'python': platform.python_version(), 'machine': platform.machine(),
         'cpu_count': os.cpu_count(), 'cores_available': cores,
         'xla_flags': os.environ.get('XLA_FLAGS', ''), 'jax_info': jax_info,
         'torch_info': torch_info}
  env['jax'] = ('jax (no successful run)' if jax_info is None else
                f'jax {jax_info["jax"]} (jaxlib {jax_info["jaxlib"]}), device '
                f'{jax_info["device"]} ({jax_info["device_kind"]}, {jax_info["backend"]}), '
                f'{jax_info["mesh_devices"]} device(s) in the mesh')
  env['threads'] = (f'{cores} core(s) available (os.cpu_count {os.cpu_count()}); XLA:CPU uses '
                    f'all of them; XLA_FLAGS={env["xla_flags"] or "(unset)"}')
  if torch_info is not None:
    check = torch_info.get('logits_max_abs_diff')
    env['torch'] = (f'torch {torch_info["torch"]}, transformers {torch_info["transformers"]}, '
                    f'peft {torch_info["peft"]}, {torch_info["torch_threads"]} torch thread(s), '
                    f'attention {torch_info["attn_implementation"]}' +
                    ('' if check is None else f'; its logits match peftjax\'s to {check:.1e} '
                     f'(max abs) on {REFERENCE_TOKENS} tokens'))
  return env


def _module(name: str) -> str:
  """A config module from a module name or a file path (`configs/x.py` -> `configs.x`)."""
  return name.removesuffix('.py').replace('/', '.') if name.endswith('.py') else name


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m experiments.bench', description=(
      'Train-step time and peak memory of the configs\' methods (LoRA vs full '
      'fine-tuning).'))
  parser.add_argument('--model', choices=('minilm', 'tiny', 'smollm2', 'tiny-llama'),
                      default='minilm',
                      help='pretrained MiniLM-L6 or a random 2-layer BERT (for tests); '
                           'SmolLM2-135M or a random 2-layer Llama (for tests)')
  parser.add_argument('--methods', default=None, type=lambda s: s.split(','),
                      help='comma-separated methods (MiniLM: configs/minilm_vader_<m>.py or '
                           'config modules; default lora,full,probe. LM: the LM config\'s '
                           'own or full; default lora,full)')
  parser.add_argument('--config', default=None,
                      help=f'language models: the config (module or .py path; default '
                           f'{LM_CONFIG})')
  parser.add_argument('--layers', type=int, default=0,
                      help='language models: keep only the first N decoder layers (quick '
                           'checks; default: all)')
  parser.add_argument('--seq_len', type=int, default=None,
                      help='tokens per row (MiniLM default 64: the width of 69%% of the main '
                           'job\'s batches, the rest are 48; LM default: the config task\'s '
                           'row length)')
  parser.add_argument('--steps', type=int, default=20, help='timed steps per round')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  parser.add_argument('--rounds', type=int, default=2, help='interleaved rounds')
  parser.add_argument('--no-torch', dest='torch', action='store_false',
                      help='skip the torch+PEFT rows even if torch is installed')
  parser.add_argument('--torch_python', default=sys.executable,
                      help='the interpreter of the torch rows: one with torch, transformers, '
                           'peft and numpy (default: this one)')
  parser.add_argument('--torch_threads', type=int, default=None,
                      help='torch intra-op threads (default: the cores available)')
  parser.add_argument('--json', metavar='PATH', help='also write the results here')
  parser.add_argument('--one', metavar='SPEC', help=argparse.SUPPRESS)  # A child's job.
  args = parser.parse_args(argv)
  for name in ('steps', 'rounds'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be at least 1')
  if args.seq_len is not None and args.seq_len < 1:
    parser.error('--seq_len must be at least 1')
  if args.warmup < 0 or args.layers < 0:
    parser.error('--warmup and --layers must be at least 0')
  lm = is_lm(args.model)
  if not lm and (args.config or args.layers):
    parser.error(f'--config and --layers are for language models, not --model {args.model}')
  args.config = _module(args.config or LM_CONFIG) if lm else None
  args.methods = args.methods or (['lora', 'full'] if lm else ['lora', 'full', 'probe'])
  if args.torch_threads is None:
    args.torch_threads = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                          else os.cpu_count())
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.one:
    print(RESULT_MARK + json.dumps(measure(json.loads(args.one))), flush=True)
    return 0
  start = time.perf_counter()
  load = os.getloadavg()
  load_before = ' '.join(f'{x:.2f}' for x in load)
  if args.torch and not torch_available(args.torch_python):
    print(f'note: torch, transformers or peft not installed for {args.torch_python}; peftjax '
          'rows only', file=sys.stderr)
    args.torch = False
  specs, described = plan(args)
  results = {name: [] for name in specs}
  workdir = tempfile.mkdtemp(prefix='peftjax-bench-')
  try:
    failed = export_twin(specs, workdir)
    for r in range(args.rounds):
      for name, spec in specs.items():
        if failed and spec['framework'] == TORCH:
          res = {'name': name, 'error': f'exporting the torch twin failed: {failed}'}
        else:
          res = run_child(spec, args.torch_python)
        results[name].append(res)
        done = ('failed: ' + res['error'].splitlines()[-1] if 'error' in res else
                f'{res["median_ms"]:.1f} ms/step, peak RSS {res["peak_rss_gb"]:.2f} GB' +
                (f', step memory {res["step_memory"]["total"] / 1e9:.3f} GB'
                 if 'step_memory' in res else ''))
        print(f'round {r + 1}/{args.rounds} {name}: {done}', file=sys.stderr, flush=True)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  summary = {name: summarize(rounds) for name, rounds in results.items()}
  rat = ratios(summary)
  env = environment(summary, args)
  env.update(busy=load[0] if load[0] > 0.5 else None, load_before=load_before,
             load_after=' '.join(f'{x:.2f}' for x in os.getloadavg()),
             wall_s=time.perf_counter() - start,
             batch_shape=next((s['batch_shape'] for rounds in results.values()
                               for s in rounds if 'batch_shape' in s),
                              [None, next(iter(specs.values()))['seq_len']]))
  text = report(summary, rat, env, described, args)
  print(text)
  if args.json:
    out = {'args': {k: v for k, v in vars(args).items() if k != 'one'}, 'environment': env,
           'methods': described, 'runs': summary, 'ratios': rat, 'report': text}
    pathlib.Path(args.json).write_text(json.dumps(out, indent=2) + '\n')
  return 1 if any('error' in s for s in summary.values()) else 0


if __name__ == '__main__':
  sys.exit(main())
