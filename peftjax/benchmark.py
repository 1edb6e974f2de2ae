"""The train-step benchmark's configurations and report (`python -m experiments.bench` runs it).

A run is named by its method (`lora`, `full`, `lora@bf16`) for peftjax and `torch-<method>`
for its HF transformers + HF PEFT twin; each round of a run yields a result dict with
`framework`, `method`, `trainable_params`, `median_ms`, `times_ms`, `peak_rss_gb`, `info`
(and `compile_s` for peftjax), or `{'name', 'error'}`.
"""
from __future__ import annotations

import importlib
import statistics

import ml_collections
import numpy as np

from peftjax.core import paths as P
from peftjax.data import assets
from peftjax.models import TINY_BERT, bert, minilm

JAX = 'peftjax'
TORCH = 'torch'

VARIANTS = {'bf16': ('train', 'compute_dtype', 'bfloat16'), 'remat': ('model', 'remat', True)}


def load_config(module: str, model: str = 'minilm', variant: str = ''):
  """`get_config()` of a config module with `variant`s (`VARIANTS` joined by '+') applied;
  `model='tiny'` swaps in a small random BERT."""
  config = importlib.import_module(module).get_config()
  for name in filter(None, variant.split('+')):
    if name not in VARIANTS:
      raise ValueError(f'unknown variant {name!r}; expected one of {sorted(VARIANTS)}')
    group, key, value = VARIANTS[name]
    config[group][key] = value
  if model == 'tiny':
    config.model = ml_collections.ConfigDict(TINY_BERT)
  elif model != 'minilm':
    raise ValueError(f"unknown --model {model!r}; expected 'minilm' or 'tiny'")
  return config


def torch_plan(config, model: str) -> dict | None:
  """How the HF side mirrors `config.method`: LoRA kwargs and HF names of trained weights.

  Returns None for a method with no HF PEFT counterpart here.
  """
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
  hf_of = {'/'.join(p): name for name, (p, _) in minilm.hf_name_map(bert_config).items()}
  shapes = {'/'.join(p): s for p, s in minilm.hf_name_map(bert_config).values()}
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
  return {'path': path, 'config': hf_config, 'lora': lora, 'trainable': trainable}


def summarize(rounds: list[dict]) -> dict:
  """Aggregates one run's per-round results: median over rounds of the round medians."""
  ok = [r for r in rounds if 'error' not in r]
  if not ok:
    return {'error': rounds[-1]['error'], 'rounds': rounds}
  pooled = np.concatenate([r['times_ms'] for r in ok])
  median = statistics.median(r['median_ms'] for r in ok)
  return {
      'framework': ok[0]['framework'], 'method': ok[0]['method'],
      'trainable_params': ok[0]['trainable_params'], 'median_ms': median,
      'steps_per_s': 1e3 / median,
      'p10_ms': float(np.percentile(pooled, 10)), 'p90_ms': float(np.percentile(pooled, 90)),
      'round_medians_ms': [r['median_ms'] for r in ok],
      'peak_rss_gb': max(r['peak_rss_gb'] for r in ok),
      'compile_s': statistics.median(r['compile_s'] for r in ok) if 'compile_s' in ok[0] else None,
      'info': ok[0]['info'], 'failed_rounds': len(rounds) - len(ok), 'rounds': rounds,
  }


def ratios(summary: dict) -> dict:
  """Step-time ratios: each run to its framework's full run, and peftjax to torch."""
  out = {'to_full': {}, 'peftjax_to_torch': {}}
  for name, s in summary.items():
    if 'error' in s:
      continue
    full = summary.get('full' if s['framework'] == JAX else 'torch-full', {})
    if 'median_ms' in full:
      out['to_full'][name] = s['median_ms'] / full['median_ms']
    twin = summary.get(f'torch-{name}', {})
    if s['framework'] == JAX and 'median_ms' in twin:
      out['peftjax_to_torch'][name] = s['median_ms'] / twin['median_ms']
  return out


def _fmt(x, spec: str, none: str = '—') -> str:
  return none if x is None else format(x, spec)


def report(summary: dict, rat: dict, env: dict, described: dict, args) -> str:
  """The markdown report: table, explicit ratios, versions, device and threads; `args` has
  the command's `model`, `rounds`, `steps` and `warmup`."""
  has_torch = any(n.startswith('torch-') for n in summary)
  label = {JAX: 'peftjax', TORCH: 'torch+PEFT'}
  head = ['run', 'trainable params', 'step ms (median)', 'steps/s', 'ratio to full (time)',
          'peak RSS GB', 'step ms p10–p90']
  if has_torch:
    head.append('peftjax ÷ torch (time)')
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, s in summary.items():
    framework = TORCH if name.startswith('torch-') else JAX
    method = name.removeprefix('torch-')
    if 'error' in s:
      lines.append(f'| {label[framework]} {method} | failed: '
                   f'{s["error"].splitlines()[-1][:80]} |' + ' |' * (len(head) - 2))
      continue
    row = [f'{label[framework]} {method}', f'{s["trainable_params"]:,}',
           f'{s["median_ms"]:.1f}', f'{s["steps_per_s"]:.2f}',
           _fmt(rat['to_full'].get(name), '.3f'), f'{s["peak_rss_gb"]:.2f}',
           f'{s["p10_ms"]:.1f}–{s["p90_ms"]:.1f}']
    if has_torch:
      row.append(_fmt(rat['peftjax_to_torch'].get(method) if framework == TORCH else None,
                      '.3f'))
    lines.append('| ' + ' | '.join(row) + ' |')

  out = [f'## Train step, batch {env["batch_shape"][0]} × {env["batch_shape"][1]} tokens, '
         f'{args.model} ({args.rounds} round(s) × {args.steps} timed steps, '
         f'{args.warmup} warm-up)', '', *lines, '']
  to_full = rat['to_full']
  if 'lora' in to_full:
    out.append(f'**peftjax LoRA ÷ full step time: {to_full["lora"]:.3f}** '
               f'(LoRA {1 / to_full["lora"]:.2f}× the full fine-tuning steps/s)')
  if 'torch-lora' in to_full:
    out.append(f'torch+PEFT LoRA ÷ full step time: {to_full["torch-lora"]:.3f}')
  if rat['peftjax_to_torch']:
    out.append('peftjax ÷ torch step time: ' + ', '.join(
        f'{m} {r:.3f}' for m, r in rat['peftjax_to_torch'].items()))
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
  return '\n'.join(out)
