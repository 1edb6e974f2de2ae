"""The train-step benchmark's configurations and report (`python -m experiments.bench` runs it).

A run is named by its method (`lora`, `full`, `lora@bf16`) for peftjax and `torch-<method>`
for its HF transformers + HF PEFT twin; each round of a run yields a result dict with
`framework`, `method`, `trainable_params`, `batch_shape`, `median_ms`, `times_ms`,
`peak_rss_gb`, `steps_peak_rss_gb`, `info` (and for peftjax `compile_s`, `step_memory`: XLA's
memory analysis of the compiled step in bytes, and `device_peak_gb`: the device's peak bytes
in use, None on CPU), or `{'name', 'error'}`. Models: MiniLM-L6 sentence classification
(`minilm`, or a random 2-layer BERT `tiny`) with a config module per method, or a language
model (`smollm2`, or a random 2-layer Llama `tiny-llama`) with one LM config (`LM_CONFIG`)
whose method a run may replace.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import statistics

import ml_collections
import numpy as np

from peftjax.core import paths as P
from peftjax.data import assets
from peftjax.models import TINY_BERT, TINY_LLAMA, Model, bert, minilm

JAX = 'peftjax'
TORCH = 'torch'

VARIANTS = {'bf16': ('train', 'compute_dtype', 'bfloat16'), 'remat': ('model', 'remat', True)}
CLASSIFIERS = ('minilm', 'tiny')
LANGUAGE_MODELS = ('smollm2', 'tiny-llama')
LM_CONFIG = 'configs.ul2r_smollm2_lora'


def is_lm(model: str) -> bool:
  return model in LANGUAGE_MODELS


def load_config(module: str, model: str = 'minilm', variant: str = '', method: str = ''):
  """`get_config()` (`get_config(ARG)` for `module:ARG`) of a config module with `variant`s
  (`VARIANTS` joined by '+') applied; `model='tiny'` / `'tiny-llama'` swaps in a small random
  BERT / Llama; `method`, unless it is the config's own, replaces the config's method by
  that one with its defaults."""
  if model not in CLASSIFIERS + LANGUAGE_MODELS:
    raise ValueError(f'unknown --model {model!r}; expected one of '
                     f'{list(CLASSIFIERS + LANGUAGE_MODELS)}')
  module, _, arg = module.partition(':')
  get_config = importlib.import_module(module).get_config
  config = get_config(arg) if arg else get_config()
  if model == 'tiny':
    config.model = ml_collections.ConfigDict(TINY_BERT)
  elif model == 'tiny-llama':
    config.model = ml_collections.ConfigDict({**TINY_LLAMA, 'init': '', 'remat': False})
  if method and method != config.method.name:
    config.method = ml_collections.ConfigDict({'name': method, 'init': ''})
  for name in filter(None, variant.split('+')):
    if name not in VARIANTS:
      raise ValueError(f'unknown variant {name!r}; expected one of {sorted(VARIANTS)}')
    group, key, value = VARIANTS[name]
    config[group][key] = value
  return config


def lm_row_length(config) -> int:
  """Tokens per row of the config's LM task: `data.length` for 'causal_lm'; for 'ul2' the
  prefix-LM rows that `Denoising` packs its `data.length`-token chunks into."""
  from peftjax.objectives import ul2  # pylint: disable=g-import-not-at-top
  from peftjax.tasks.lm import Denoising  # pylint: disable=g-import-not-at-top
  d = config.data
  if config.task == 'causal_lm':
    return int(d.length)
  if config.task != 'ul2' or d.format != 'prefix_lm':
    raise ValueError(f"expected a decoder-only LM config (task 'causal_lm', or 'ul2' with "
                     f"data.format 'prefix_lm'), got task {config.task!r}, format "
                     f"{d.get('format')!r}")
  mixture = ul2.make_mixture(d.mixture, weights=tuple(d.weights) or None,
                             paradigm_tokens=None if d.paradigm else {})
  task = Denoising(None, {'train': np.zeros((1, d.length), np.int32)}, mixture, d.format,
                   sentinel_ids=[], paradigm_ids={}, bos_id=0,
                   examples_per_row=d.examples_per_row)
  return task.rows['length']


def llama_config(model_config, layers: int = 0):
  """The `LlamaConfig` of a config's model block (SmolLM2's from its GGUF metadata), cut to
  its first `layers` decoder layers if `layers` > 0."""
  from peftjax.models import _sizes, llama, smollm2  # pylint: disable=g-import-not-at-top
  if model_config.name == 'smollm2':
    cfg = smollm2.read_config()
  elif model_config.name == 'llama':
    cfg = llama.LlamaConfig(**_sizes(model_config))
  else:
    raise ValueError(f"expected model 'smollm2' or 'llama', got {model_config.name!r}")
  if layers and not 0 < layers <= cfg.num_layers:
    raise ValueError(f'--layers {layers}: the model has {cfg.num_layers} layers')
  return dataclasses.replace(cfg, num_layers=layers) if layers else cfg


def first_layers(model: Model, layers: int = 0) -> Model:
  """A `Llama` model cut to its first `layers` decoder layers (0: unchanged), for quick runs."""
  if not layers:
    return model
  from peftjax.models.llama import Llama  # pylint: disable=g-import-not-at-top
  cfg = model.module.config
  if not 0 < layers <= cfg.num_layers:
    raise ValueError(f'--layers {layers}: the model has {cfg.num_layers} layers')
  module = Llama(dataclasses.replace(cfg, num_layers=layers), model.module.remat)
  params = {k: v for k, v in model.params.items()
            if not k.startswith('layers_') or int(k.removeprefix('layers_')) < layers}
  return Model(module, params, f'{model.model_id}[:{layers} layers]', model.logical_axes)


def torch_plan(config, model: str, layers: int = 0) -> dict | None:
  """How the HF side mirrors `config.method`: `config` (HF config kwargs) or `path` (an HF
  checkpoint; for a language model the caller exports ours there), LoRA kwargs and HF names
  of trained weights. Returns None for a method with no HF PEFT counterpart here."""
  if is_lm(model):
    hf_of, shapes, base = _llama_names(llama_config(config.model, layers))
  else:
    hf_of, shapes, base = _bert_names(model)
  method = config.method.to_dict()
  name = method.get('name')
  lora, trainable = None, []
  if name in ('lora', 'rslora'):
    if method.get('rank_pattern') or method.get('alpha_pattern'):
      return None
    matrices = [p for p, s in shapes.items() if len(s) == 2]
    chosen = P.select(matrices, method['targets'])
    if not all(p.endswith('/kernel') for p in chosen):
      return None  # HF PEFT LoRA on embeddings differs in kind.
    lora = {'r': method.get('rank', 8), 'lora_alpha': method.get('alpha', 16.0),
            'lora_dropout': method.get('dropout', 0.0),
            'use_rslora': bool(method.get('rslora', False) or name == 'rslora'),
            'target_modules': [hf_of[p].removesuffix('.weight') for p in chosen]}
  elif name == 'full':
    trainable = [hf_of[p] for p in P.select(list(hf_of), method.get('targets', ('.*',)))]
  elif name != 'probe':
    return None
  return {**base, 'lora': lora, 'trainable': trainable}


def _bert_names(model: str):
  if model == 'minilm':
    path = str(assets.asset_path('minilm'))
    bert_config, hf_config = minilm.load_config(path), None
  else:
    sizes = {k: v for k, v in TINY_BERT.items() if k != 'name'}
    vocab = minilm.load_tokenizer().get_vocab_size()
    bert_config, path = bert.BertConfig(vocab_size=vocab, **sizes), None
    hf_config = {'vocab_size': vocab, 'hidden_size': sizes['hidden_size'],
                 'num_hidden_layers': sizes['num_layers'],
                 'num_attention_heads': sizes['num_heads'],
                 'intermediate_size': sizes['intermediate_size']}
  names = minilm.hf_name_map(bert_config)
  hf_of = {'/'.join(p): name for name, (p, _) in names.items()}
  shapes = {'/'.join(p): s for p, s in names.values()}
  return hf_of, shapes, {'path': path, 'config': hf_config}


def _llama_names(cfg):
  import jax  # pylint: disable=g-import-not-at-top
  from peftjax.models import hf_llama  # pylint: disable=g-import-not-at-top
  from peftjax.models.llama import Llama  # pylint: disable=g-import-not-at-top
  ids = np.zeros((1, 1), np.int32)
  tree = jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), ids))['params']
  shapes = {p: tuple(x.shape) for p, x in P.flatten(tree).items()}
  return ({p: hf_llama.hf_name(p) for p in shapes}, shapes,
          {'path': None, 'config': hf_llama.hf_config(cfg)})


def summarize(rounds: list[dict]) -> dict:
  """Aggregates one run's per-round results: median over rounds of the round medians."""
  ok = [r for r in rounds if 'error' not in r]
  if not ok:
    return {'error': rounds[-1]['error'], 'rounds': rounds}
  pooled = np.concatenate([r['times_ms'] for r in ok])
  median = statistics.median(r['median_ms'] for r in ok)
  shape = ok[0].get('batch_shape')
  largest = lambda key: max((r[key] for r in ok if r.get(key) is not None), default=None)
  return {
      'framework': ok[0]['framework'], 'method': ok[0]['method'],
      'trainable_params': ok[0]['trainable_params'], 'batch_shape': shape,
      'median_ms': median, 'steps_per_s': 1e3 / median,
      'tokens_per_s': math.prod(shape) * 1e3 / median if shape else None,
      'p10_ms': float(np.percentile(pooled, 10)), 'p90_ms': float(np.percentile(pooled, 90)),
      'round_medians_ms': [r['median_ms'] for r in ok],
      'peak_rss_gb': max(r['peak_rss_gb'] for r in ok),
      'steps_peak_rss_gb': largest('steps_peak_rss_gb'),
      'step_memory_gb': max((r['step_memory']['total'] / 1e9 for r in ok
                             if 'step_memory' in r), default=None),
      'device_peak_gb': largest('device_peak_gb'),
      'compile_s': statistics.median(r['compile_s'] for r in ok) if 'compile_s' in ok[0] else None,
      'info': ok[0]['info'], 'failed_rounds': len(rounds) - len(ok), 'rounds': rounds,
  }


# Memory ratios to full: (the summary's measure, its label), in the report's order.
MEMORY = {'step_memory_to_full': ('step_memory_gb', 'step memory'),
          'device_peak_to_full': ('device_peak_gb', 'device peak'),
          'rss_to_full': ('peak_rss_gb', 'peak RSS')}


def ratios(summary: dict) -> dict:
  """Ratios of each run to its framework's full run: step time (`to_full`) and the memory
  measures (`MEMORY`); and peftjax to torch step time (also as tokens/s, for runs of the same
  batch shape)."""
  out = {'to_full': {}, 'peftjax_to_torch': {}, 'tokens_peftjax_to_torch': {},
         **{key: {} for key in MEMORY}}
  for name, s in summary.items():
    if 'error' in s:
      continue
    full = summary.get('full' if s['framework'] == JAX else 'torch-full', {})
    if 'median_ms' in full:
      out['to_full'][name] = s['median_ms'] / full['median_ms']
    for key, (measure, _) in MEMORY.items():
      if s.get(measure) is not None and full.get(measure):
        out[key][name] = s[measure] / full[measure]
    twin = summary.get(f'torch-{name}', {})
    if s['framework'] == JAX and 'median_ms' in twin:
      out['peftjax_to_torch'][name] = s['median_ms'] / twin['median_ms']
      if s.get('tokens_per_s') and s.get('batch_shape') == twin.get('batch_shape'):
        out['tokens_peftjax_to_torch'][name] = s['tokens_per_s'] / twin['tokens_per_s']
  return out


def _fmt(x, spec: str, none: str = '—') -> str:
  return none if x is None else format(x, spec)


def _columns(tokens: bool, has_torch: bool, rat: dict, summary: dict) -> list:
  """(header, cell of (name, summary)) of the table; `tokens`: a language model's columns."""
  twin = lambda key: lambda n, s: _fmt(  # pylint: disable=g-long-lambda
      rat[key].get(n.removeprefix('torch-')) if n.startswith('torch-') else None, '.3f')
  cols = [('trainable params', lambda n, s: f'{s["trainable_params"]:,}')]
  if tokens:
    cols.append(('tokens/s', lambda n, s: _fmt(s['tokens_per_s'], ',.0f')))
  cols += [('step ms (median)', lambda n, s: f'{s["median_ms"]:.1f}'),
           ('steps/s', lambda n, s: f'{s["steps_per_s"]:.2f}'),
           ('ratio to full (time)', lambda n, s: _fmt(rat['to_full'].get(n), '.3f')),
           ('peak RSS GB', lambda n, s: f'{s["peak_rss_gb"]:.2f}')]
  if tokens:
    cols.append(('steps peak RSS GB', lambda n, s: _fmt(s['steps_peak_rss_gb'], '.2f')))
  cols += [('ratio to full (RSS)', lambda n, s: _fmt(rat['rss_to_full'].get(n), '.3f')),
           ('step memory GB', lambda n, s: _fmt(s.get('step_memory_gb'), '.3f')),
           ('ratio to full (step memory)',
            lambda n, s: _fmt(rat['step_memory_to_full'].get(n), '.3f'))]
  if any(s.get('device_peak_gb') is not None for s in summary.values()):
    cols += [('device peak GB', lambda n, s: _fmt(s.get('device_peak_gb'), '.3f')),
             ('ratio to full (device peak)',
              lambda n, s: _fmt(rat['device_peak_to_full'].get(n), '.3f'))]
  cols.append(('step ms p10–p90', lambda n, s: f'{s["p10_ms"]:.1f}–{s["p90_ms"]:.1f}'))
  if has_torch:
    cols.append(('peftjax ÷ torch (time)', twin('peftjax_to_torch')))
    if tokens:
      cols.append(('peftjax ÷ torch (tokens/s)', twin('tokens_peftjax_to_torch')))
  return cols


def report(summary: dict, rat: dict, env: dict, described: dict, args) -> str:
  """The markdown report: table, explicit ratios, versions, device and threads; `args` has
  the command's `model`, `rounds`, `steps` and `warmup`."""
  tokens = is_lm(args.model)
  has_torch = any(n.startswith('torch-') for n in summary)
  label = {JAX: 'peftjax', TORCH: 'torch+PEFT'}
  cols = _columns(tokens, has_torch, rat, summary)
  lines = ['| run | ' + ' | '.join(h for h, _ in cols) + ' |', '|' + '---|' * (len(cols) + 1)]
  for name, s in summary.items():
    framework = TORCH if name.startswith('torch-') else JAX
    run = f'{label[framework]} {name.removeprefix("torch-")}'
    if 'error' in s:
      lines.append(f'| {run} | failed: {s["error"].splitlines()[-1][:80]} |' +
                   ' |' * (len(cols) - 1))
    else:
      lines.append(f'| {run} | ' + ' | '.join(cell(name, s) for _, cell in cols) + ' |')

  layers = f', first {args.layers} layers' if getattr(args, 'layers', 0) else ''
  out = [f'## Train step, batch {env["batch_shape"][0]} × {env["batch_shape"][1]} tokens, '
         f'{args.model}{layers} ({args.rounds} round(s) × {args.steps} timed steps, '
         f'{args.warmup} warm-up)', '', *lines, '']
  to_full = rat['to_full']
  if 'lora' in to_full:
    out.append(f'**peftjax LoRA ÷ full step time: {to_full["lora"]:.3f}** '
               f'(LoRA {1 / to_full["lora"]:.2f}× the full fine-tuning steps/s)')
  if 'torch-lora' in to_full:
    out.append(f'torch+PEFT LoRA ÷ full step time: {to_full["torch-lora"]:.3f}')
  memory = [n for n in rat['step_memory_to_full'] if n != 'full']
  if memory:
    out.append('**peftjax peak memory ÷ full fine-tuning\'s**: ' + '; '.join(
        f'{n} ' + ', '.join(f'{label} {rat[key][n]:.3f}' for key, (_, label) in MEMORY.items()
                            if n in rat[key]) for n in memory))
  if rat['peftjax_to_torch']:
    out.append('peftjax ÷ torch step time: ' + ', '.join(
        f'{m} {r:.3f}' for m, r in rat['peftjax_to_torch'].items()))
  if tokens and rat['tokens_peftjax_to_torch']:
    out.append('peftjax ÷ torch tokens/s: ' + ', '.join(
        f'{m} {r:.2f}×' for m, r in rat['tokens_peftjax_to_torch'].items()))
    out.append('peak RSS, peftjax vs torch+PEFT (GB): ' + '; '.join(
        f'{m} {summary[m]["peak_rss_gb"]:.2f} vs {summary["torch-" + m]["peak_rss_gb"]:.2f} '
        f'(steps {_fmt(summary[m]["steps_peak_rss_gb"], ".2f")} vs '
        f'{_fmt(summary["torch-" + m]["steps_peak_rss_gb"], ".2f")})'
        for m in rat['tokens_peftjax_to_torch']))
  out += ['', 'Methods (from their configs):']
  out += [f'- {m}: {d}' for m, d in described.items()]
  out += ['', f'- {env["jax"]}', f'- {env["threads"]}']
  if env.get('torch'):
    out.append(f'- {env["torch"]}')
  out.append(f'- load average before / after: {env["load_before"]} / {env["load_after"]}; '
             f'wall time {env["wall_s"]:.0f} s')
  if env['busy']:
    out.append(f'- warning: the machine was busy (1-minute load {env["busy"]:.2f} on '
               f'{env["cores_available"]} cores before the run): timings are contended, '
               'multi-threaded torch most of all; rerun on a quiet machine.')
  out.append('- step ms: median over rounds of each round\'s median; p10–p90 over all timed '
             'steps; peak RSS: the largest over rounds, per configuration process.')
  out.append('- step memory: XLA\'s memory analysis of the compiled train step, per device '
             '(arguments + outputs + temporaries − outputs aliased to donated arguments): what '
             'an accelerator allocates for the step (weights, optimiser state, batch, '
             'activations, gradients). Peak RSS is the whole process: on CPU also the runtime, '
             'the compiler\'s heap, host copies of the params and freed memory the allocator '
             'keeps.' + (' device peak: the device\'s peak bytes in use over the process.'
                         if rat['device_peak_to_full'] else ''))
  if tokens:
    out += ['- tokens/s: batch × length ÷ median step time (every row is one full segment). '
            'steps peak RSS: the high-water mark from the first warm-up step on (after '
            'loading and compiling). peftjax runs its task\'s prefix-LM mask (a dense mask, '
            'what a causal one costs in XLA), torch HF\'s causal mask (SDPA); both losses '
            'are the mean next-token cross-entropy on the same target tokens.']
  return '\n'.join(out)
