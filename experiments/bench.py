"""Train-step time and peak memory of LoRA vs full fine-tuning (and the probe) on MiniLM-L6.

  python -m experiments.bench [--seq_len 64] [--steps 20] [--rounds 2] [--json PATH]
                              [--methods lora,full,probe,lora@bf16] [--no-torch] [--model tiny]

Each method comes from its experiment config (`configs/minilm_vader_<method>.py`): the same
method, optimiser, seed and batch size as the main job, on a batch of `batch_size x seq_len`
random token ids with a full attention mask, through the trainer's jitted, donating
`make_train_step`. Every configuration runs in its own subprocess, so that its peak RSS is its
own: the child compiles, warms up, then times `--steps` steps, each to `block_until_ready`.
Rounds interleave the configurations (lora, full, probe, lora, ...) so that machine noise hits
all alike; the report gives the median over rounds of each round's median step time.

Where `torch`, `transformers` and `peft` are installed, the same steps also run in HF
transformers + HF PEFT on the same weights (`BertModel`, mean pooling, `Linear(width, 2)`,
LoRA on the HF modules that the config's targets select, AdamW with the config's settings),
as extra rows with the time ratio peftjax / torch. torch is never required.

A method may carry variants after `@`, joined by `+`: `lora@bf16` (train.compute_dtype
bfloat16), `lora@remat` (model.remat), `lora@bf16+remat`; these rows have no torch twin.
This file measures; `peftjax.benchmark` loads the configs, plans the torch twin and reports.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

import numpy as np

from peftjax.benchmark import JAX, TORCH, load_config, ratios, report, summarize, torch_plan

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULT_MARK = 'BENCH_RESULT '
NUM_CLASSES = 2  # VADER sentiment: rating > 0.
_CHILD_TIMEOUT_S = 3600


def config_module(method: str) -> str:
  """The config module of a method name (`lora` -> `configs.minilm_vader_lora`)."""
  return method if '.' in method else f'configs.minilm_vader_{method}'


def make_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
  """Random token ids in [1000, vocab) (past BERT's special and unused ids), full mask."""
  rng = np.random.default_rng(seed)
  low = min(1000, vocab_size - 1)
  return {'input_ids': rng.integers(low, vocab_size, (batch_size, seq_len), dtype=np.int32),
          'attention_mask': np.ones((batch_size, seq_len), np.int32),
          'labels': rng.integers(0, NUM_CLASSES, (batch_size,), dtype=np.int32),
          'weights': np.ones((batch_size,), np.float32)}


def _stats(times_s) -> dict:
  ms = np.asarray(times_s) * 1e3
  p10, p50, p90 = np.percentile(ms, [10, 50, 90])
  return {'median_ms': float(p50), 'p10_ms': float(p10), 'p90_ms': float(p90),
          'times_ms': [round(float(t), 3) for t in ms]}


def peak_rss_gb() -> float:
  """This process's peak resident set size in GB (10^9 bytes); Linux reports KiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


# The children: one configuration each.


def measure_jax(spec: dict) -> dict:
  """Times the trainer's train step for the config module `spec['config']`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  from peftjax.core.adapter import num_params  # pylint: disable=g-import-not-at-top
  from peftjax.models import build  # pylint: disable=g-import-not-at-top
  from peftjax.tasks.classification import SentenceClassification  # pylint: disable=g-import-not-at-top
  from peftjax.parallel import mesh as M  # pylint: disable=g-import-not-at-top
  from peftjax.train import step as S  # pylint: disable=g-import-not-at-top
  from peftjax.train.loop import method_from_config, prepare  # pylint: disable=g-import-not-at-top

  tic = time.perf_counter()
  config = load_config(spec['config'], spec['model'], spec.get('variant', ''))
  model = build(config.model, config.seed)
  task = SentenceClassification(model, {}, num_classes=NUM_CLASSES)  # batches come from here
  adapter = method_from_config(config.method)
  k_adapter, k_head = jax.random.split(jax.random.key(config.seed))
  frozen, adapter_state = adapter.init(k_adapter, model.params)
  head = task.init_head(k_head)
  tx = S.make_optimizer(config.optimizer, adapter, spec['warmup'] + spec['steps'])

  run = prepare(config, task, adapter, frozen, {'adapter': adapter_state, 'head': head}, tx)
  state, frozen = run.state, run.frozen
  batch = M.put(make_batch(config.train.batch_size, spec['seq_len'],
                           model.module.config.vocab_size), run.batch_sharding)
  setup_s = time.perf_counter() - tic

  tic = time.perf_counter()
  compiled = run.train_step.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - tic
  for _ in range(spec['warmup']):
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
  times = []
  for _ in range(spec['steps']):
    tic = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - tic)
  loss = float(metrics['loss'])
  device = jax.devices()[0]
  return {
      'framework': JAX, 'method': config.method.name,
      'trainable_params': num_params(state.trainable),
      'batch_shape': [config.train.batch_size, spec['seq_len']],
      **_stats(times), 'peak_rss_gb': peak_rss_gb(), 'setup_s': setup_s,
      'compile_s': compile_s, 'final_loss': loss,
      'info': {'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
               'backend': jax.default_backend(), 'device': str(device),
               'device_kind': device.device_kind, 'devices': jax.device_count(),
               'mesh_devices': run.mesh.size},
  }


def measure_torch(spec: dict) -> dict:
  """Times the same step in HF transformers + HF PEFT; `spec['hf']` comes from `torch_plan`."""
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  tic = time.perf_counter()
  torch.set_num_threads(spec['threads'])
  torch.manual_seed(spec['seed'])
  hf, opt = spec['hf'], spec['optimizer']
  if hf.get('path'):
    bert = transformers.BertModel.from_pretrained(hf['path'], add_pooling_layer=False)
  else:
    bert = transformers.BertModel(transformers.BertConfig(**hf['config']),
                                  add_pooling_layer=False)
  bert.requires_grad_(False)
  if hf['lora'] is not None:
    bert = peft.get_peft_model(bert, peft.LoraConfig(**hf['lora']))
  trainable = set(hf['trainable'])
  for name, p in bert.named_parameters():
    if name.removeprefix('base_model.model.') in trainable:
      p.requires_grad_(True)
  head = torch.nn.Linear(bert.config.hidden_size, NUM_CLASSES)
  bert.train()
  head.train()
  params = [p for p in [*bert.parameters(), *head.parameters()] if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=opt['lr'], betas=(opt['b1'], opt['b2']),
                                eps=opt['eps'], weight_decay=opt['weight_decay'])
  batch = {k: torch.from_numpy(v) for k, v in make_batch(
      spec['batch_size'], spec['seq_len'], bert.config.vocab_size).items()}
  mask = batch['attention_mask'].unsqueeze(-1).float()

  def step():
    optimizer.zero_grad(set_to_none=True)
    hidden = bert(input_ids=batch['input_ids'],
                  attention_mask=batch['attention_mask']).last_hidden_state
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    loss = torch.nn.functional.cross_entropy(head(pooled), batch['labels'].long())
    loss.backward()
    if opt.get('clip_norm'):
      torch.nn.utils.clip_grad_norm_(params, opt['clip_norm'])
    optimizer.step()
    return loss.item()

  setup_s = time.perf_counter() - tic
  for _ in range(spec['warmup']):
    step()
  times = []
  for _ in range(spec['steps']):
    tic = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - tic)
  return {
      'framework': TORCH, 'method': spec['method'],
      'trainable_params': int(sum(p.numel() for p in params)),
      'batch_shape': [spec['batch_size'], spec['seq_len']],
      **_stats(times), 'peak_rss_gb': peak_rss_gb(), 'setup_s': setup_s, 'final_loss': loss,
      'info': {'torch': torch.__version__, 'transformers': transformers.__version__,
               'peft': peft.__version__, 'torch_threads': torch.get_num_threads(),
               'attn_implementation': getattr(bert.config, '_attn_implementation', None)},
  }


def measure(spec: dict) -> dict:
  """Measures one configuration (run it in a fresh process for a meaningful peak RSS)."""
  result = measure_torch(spec) if spec['framework'] == TORCH else measure_jax(spec)
  return {'name': spec['name'], **result}


# The parent: plan, run the children, report.


def torch_available() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ('torch', 'transformers', 'peft'))


def describe_method(config) -> str:
  m = {k: v for k, v in config.method.to_dict().items() if k != 'name'}
  args = ', '.join(f'{k}={list(v) if isinstance(v, tuple) else v}' for k, v in m.items())
  o = config.optimizer
  extras = [f'{config.train.compute_dtype} compute'] if config.train.get(
      'compute_dtype', 'float32') != 'float32' else []
  extras += ['remat per block'] if config.model.get('remat') else []
  return (f'{config.method.name}({args}); AdamW lr {o.lr:g}, wd {o.weight_decay:g}, '
          f'{o.get("schedule", "constant")}' + ''.join(f'; {e}' for e in extras))


def plan(args) -> tuple[dict[str, dict], dict[str, str]]:
  """Child specs by run name (peftjax ones first), and a description of each method."""
  specs, described, torch_specs = {}, {}, {}
  common = {'model': args.model, 'seq_len': args.seq_len, 'steps': args.steps,
            'warmup': args.warmup}
  for method in args.methods:
    base, _, variant = method.partition('@')
    module = config_module(base)
    config = load_config(module, args.model, variant)
    described[method] = describe_method(config)
    specs[method] = {'name': method, 'framework': JAX, 'config': module, 'variant': variant,
                     **common}
    if args.torch and not variant:
      hf = torch_plan(config, args.model)
      if hf is None:
        print(f'note: no torch counterpart for {method}', file=sys.stderr)
        continue
      torch_specs[f'torch-{method}'] = {
          'name': f'torch-{method}', 'framework': TORCH, 'method': method, 'hf': hf,
          'seed': config.seed, 'batch_size': config.train.batch_size,
          'optimizer': {k: config.optimizer.get(k) for k in
                        ('lr', 'weight_decay', 'b1', 'b2', 'eps', 'clip_norm')},
          'threads': args.torch_threads, **common}
  return {**specs, **torch_specs}, described


def run_child(spec: dict) -> dict:
  """Runs `measure(spec)` in a fresh interpreter; returns its result or an `error`."""
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
    env['torch'] = (f'torch {torch_info["torch"]}, transformers {torch_info["transformers"]}, '
                    f'peft {torch_info["peft"]}, {torch_info["torch_threads"]} torch thread(s), '
                    f'attention {torch_info["attn_implementation"]}')
  return env


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m experiments.bench', description=(
      'Train-step time and peak RSS of the configs\' methods (LoRA vs full fine-tuning).'))
  parser.add_argument('--methods', default='lora,full,probe', type=lambda s: s.split(','),
                      help='comma-separated methods (configs/minilm_vader_<m>.py) or config '
                           'modules; default: %(default)s')
  parser.add_argument('--seq_len', type=int, default=64,
                      help='tokens per row (default %(default)s: the width of 69%% of the main '
                           'job\'s batches, the rest are 48)')
  parser.add_argument('--steps', type=int, default=20, help='timed steps per round')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  parser.add_argument('--rounds', type=int, default=2, help='interleaved rounds')
  parser.add_argument('--model', choices=('minilm', 'tiny'), default='minilm',
                      help='pretrained MiniLM-L6, or a random 2-layer BERT (for tests)')
  parser.add_argument('--no-torch', dest='torch', action='store_false',
                      help='skip the torch+PEFT rows even if torch is installed')
  parser.add_argument('--torch_threads', type=int, default=None,
                      help='torch intra-op threads (default: the cores available)')
  parser.add_argument('--json', metavar='PATH', help='also write the results here')
  parser.add_argument('--one', metavar='SPEC', help=argparse.SUPPRESS)  # A child's job.
  args = parser.parse_args(argv)
  for name in ('seq_len', 'steps', 'rounds'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be at least 1')
  if args.warmup < 0:
    parser.error('--warmup must be at least 0')
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
  if args.torch and not torch_available():
    print('note: torch, transformers or peft not installed; peftjax rows only',
          file=sys.stderr)
    args.torch = False
  specs, described = plan(args)
  results = {name: [] for name in specs}
  for r in range(args.rounds):
    for name, spec in specs.items():
      res = run_child(spec)
      results[name].append(res)
      done = ('failed: ' + res['error'].splitlines()[-1] if 'error' in res else
              f'{res["median_ms"]:.1f} ms/step, peak RSS {res["peak_rss_gb"]:.2f} GB')
      print(f'round {r + 1}/{args.rounds} {name}: {done}', file=sys.stderr, flush=True)
  summary = {name: summarize(rounds) for name, rounds in results.items()}
  rat = ratios(summary)
  env = environment(summary, args)
  env.update(busy=load[0] if load[0] > 0.5 else None, load_before=load_before,
             load_after=' '.join(f'{x:.2f}' for x in os.getloadavg()),
             wall_s=time.perf_counter() - start,
             batch_shape=next((s['batch_shape'] for rounds in results.values()
                               for s in rounds if 'batch_shape' in s), [None, args.seq_len]))
  text = report(summary, rat, env, described, args)
  print(text)
  if args.json:
    out = {'args': {k: v for k, v in vars(args).items() if k != 'one'}, 'environment': env,
           'methods': described, 'runs': summary, 'ratios': rat, 'report': text}
    pathlib.Path(args.json).write_text(json.dumps(out, indent=2) + '\n')
  return 1 if any('error' in s for s in summary.values()) else 0


if __name__ == '__main__':
  sys.exit(main())
