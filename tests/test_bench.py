"""The step-time benchmark on a tiny random BERT: the command (`experiments.bench`), its report
and the torch twin's plan (`peftjax.benchmark`)."""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys

import pytest

from peftjax import benchmark

ROOT = pathlib.Path(__file__).resolve().parent.parent
# LoRA r=8 on the 6 encoder matrices of 2 layers (hidden 32, FFN 64) plus a 32 x 2 head.
TINY_LORA_PARAMS = 2 * (4 * (32 * 8 + 8 * 32) + (32 * 8 + 8 * 64) + (64 * 8 + 8 * 32)) + 66


def _rows(table: str) -> dict[str, list[str]]:
  rows = {}
  for line in table.splitlines():
    cells = [c.strip() for c in line.strip('|').split('|')]
    if line.startswith('| peftjax ') or line.startswith('| torch+PEFT '):
      rows[cells[0]] = cells[1:]
  return rows


def _bench(*args, timeout=120):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.bench', '--model', 'tiny', '--steps', '2',
       '--rounds', '1', '--seq_len', '16', '--warmup', '1', *args],
      cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def test_command_reports_every_method_with_positive_numbers(tmp_path):
  out = tmp_path / 'bench.json'
  proc = _bench('--no-torch', '--json', str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| run | trainable params | step ms (median) | steps/s | ratio to full (time) | ' \
         'peak RSS GB |' in proc.stdout
  rows = _rows(proc.stdout)
  assert set(rows) == {'peftjax lora', 'peftjax full', 'peftjax probe'}
  for name, (params, ms, per_s, to_full, rss, spread) in rows.items():
    assert int(params.replace(',', '')) > 0, name
    assert float(ms) > 0 and float(per_s) > 0 and float(to_full) > 0 and float(rss) > 0, name
    assert re.fullmatch(r'[\d.]+–[\d.]+', spread), name
  assert rows['peftjax full'][3] == '1.000'
  assert int(rows['peftjax lora'][0].replace(',', '')) == TINY_LORA_PARAMS
  assert re.search(r'peftjax LoRA ÷ full step time: [\d.]+', proc.stdout)
  assert 'jax ' in proc.stdout and 'core(s) available' in proc.stdout

  saved = json.loads(out.read_text())
  assert saved['report'] in proc.stdout
  assert saved['environment']['batch_shape'] == [32, 16]
  lora = saved['runs']['lora']
  assert lora['median_ms'] > 0 and len(lora['rounds'][0]['times_ms']) == 2
  assert saved['ratios']['to_full']['lora'] == pytest.approx(
      lora['median_ms'] / saved['runs']['full']['median_ms'])


def _fake(name, framework, ms, params=10):
  return {'name': name, 'framework': framework, 'method': name.removeprefix('torch-'),
          'trainable_params': params, 'batch_shape': [32, 48], 'median_ms': ms,
          'p10_ms': ms * 0.9, 'p90_ms': ms * 1.1, 'times_ms': [ms * 0.9, ms, ms * 1.1],
          'peak_rss_gb': 1.0, 'info': {}}


def test_report_takes_median_over_rounds_and_states_ratios():
  results = {'lora': [_fake('lora', 'peftjax', 100.0), _fake('lora', 'peftjax', 120.0),
                      _fake('lora', 'peftjax', 400.0)],
             'full': [_fake('full', 'peftjax', 200.0)],
             'torch-lora': [_fake('torch-lora', 'torch', 80.0)],
             'torch-full': [{'name': 'torch-full', 'error': 'exit 1: boom'}]}
  summary = {n: benchmark.summarize(r) for n, r in results.items()}
  assert summary['lora']['median_ms'] == 120.0
  rat = benchmark.ratios(summary)
  assert rat['to_full'] == {'lora': 0.6, 'full': 1.0}
  assert rat['peftjax_to_torch'] == {'lora': 1.5}
  args = argparse.Namespace(model='minilm', rounds=3, steps=20, warmup=2)
  env = {'batch_shape': [32, 48], 'jax': 'jax x', 'threads': '2 core(s)', 'load_before': '0',
         'load_after': '0', 'wall_s': 1.0, 'busy': None, 'cores_available': 2}
  text = benchmark.report(summary, rat, env, {'lora': 'lora()'}, args)
  rows = _rows(text)
  assert rows['peftjax lora'][:5] == ['10', '120.0', '8.33', '0.600', '1.00']
  assert rows['torch+PEFT lora'][-1] == '1.500'
  assert rows['torch+PEFT full'][0].startswith('failed: ')
  assert 'peftjax LoRA ÷ full step time: 0.600' in text


def test_torch_twin_trains_what_the_config_trains(tmp_path):
  for module in ('torch', 'transformers', 'peft'):
    pytest.importorskip(module)
  config = benchmark.load_config('configs.minilm_vader_lora', 'tiny')
  hf = benchmark.torch_plan(config, 'tiny')
  assert len(hf['lora']['target_modules']) == 2 * 6
  assert hf['lora']['r'] == 8 and hf['lora']['lora_alpha'] == 16.0
  assert hf['lora']['lora_dropout'] == 0.1
  full = benchmark.torch_plan(benchmark.load_config('configs.minilm_vader_full', 'tiny'), 'tiny')
  assert full['lora'] is None and 'embeddings.word_embeddings.weight' in full['trainable']
  probe = benchmark.torch_plan(benchmark.load_config('configs.minilm_vader_probe', 'tiny'), 'tiny')
  assert probe == {**full, 'trainable': []}

  out = tmp_path / 'bench.json'
  proc = _bench('--methods', 'lora', '--torch_threads', '1', '--json', str(out), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.loads(out.read_text())
  twin = saved['runs']['torch-lora']
  assert 'error' not in twin, twin['error']
  assert twin['trainable_params'] == saved['runs']['lora']['trainable_params'] \
      == TINY_LORA_PARAMS
  assert twin['median_ms'] > 0 and twin['peak_rss_gb'] > 0
  assert saved['ratios']['peftjax_to_torch']['lora'] > 0
  assert '| torch+PEFT lora |' in proc.stdout
