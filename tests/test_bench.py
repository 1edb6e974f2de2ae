"""The step-time benchmark on a tiny random BERT and a tiny random Llama: the command
(`experiments.bench`), its report, the torch twin's plan (`peftjax.benchmark`) and, where
torch is installed, the twin itself (`experiments.bench_torch`)."""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from experiments import bench, bench_torch
from peftjax import benchmark
from peftjax.models import TINY_LLAMA, build
from peftjax.tasks.lm import CausalLM

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


@pytest.mark.long
def test_command_reports_every_method_with_positive_numbers(tmp_path):
  out = tmp_path / 'bench.json'
  proc = _bench('--no-torch', '--json', str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| run | trainable params | step ms (median) | steps/s | ratio to full (time) | ' \
         'peak RSS GB | ratio to full (RSS) | step memory GB | ratio to full (step memory) |' \
         in proc.stdout
  rows = _rows(proc.stdout)
  assert set(rows) == {'peftjax lora', 'peftjax full', 'peftjax probe'}
  for name, (params, ms, per_s, to_full, rss, rss_ratio, memory, memory_ratio,
             spread) in rows.items():
    assert int(params.replace(',', '')) > 0, name
    assert float(ms) > 0 and float(per_s) > 0 and float(to_full) > 0 and float(rss) > 0, name
    assert float(rss_ratio) > 0 and float(memory) > 0 and float(memory_ratio) > 0, name
    assert re.fullmatch(r'[\d.]+–[\d.]+', spread), name
  assert rows['peftjax full'][3] == rows['peftjax full'][5] == rows['peftjax full'][7] == '1.000'
  assert float(rows['peftjax probe'][7]) < float(rows['peftjax lora'][7]) < 1.0
  assert re.search(r"peftjax peak memory ÷ full fine-tuning's\*\*: lora step memory [\d.]+, "
                   r'peak RSS [\d.]+; probe', proc.stdout)
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
  memory = lora['rounds'][0]['step_memory']
  assert memory['total'] == (memory['arguments'] + memory['outputs'] + memory['temporaries'] -
                             memory['aliased']) == pytest.approx(lora['step_memory_gb'] * 1e9)
  assert saved['ratios']['step_memory_to_full']['lora'] == pytest.approx(
      lora['step_memory_gb'] / saved['runs']['full']['step_memory_gb'])
  assert lora['device_peak_gb'] is None  # CPU: no device memory stats


def test_step_memory_counts_a_donated_argument_once():
  """A step's memory: arguments + outputs + temporaries, less outputs written into donated
  arguments."""
  x = jax.numpy.ones(1000, jax.numpy.float32)
  step = lambda x: x * 2 + 1
  copying = bench.step_memory(jax.jit(step).lower(x).compile())
  donating = bench.step_memory(jax.jit(step, donate_argnums=0).lower(x).compile())
  assert copying['arguments'] == copying['outputs'] == 4000 and copying['aliased'] == 0
  assert copying['total'] == 8000 + copying['temporaries']
  assert donating['aliased'] == 4000 and donating['total'] == 4000 + donating['temporaries']


def _fake(name, framework, ms, params=10, rss=1.0, memory=None, device=None):
  out = {'name': name, 'framework': framework, 'method': name.removeprefix('torch-'),
         'trainable_params': params, 'batch_shape': [32, 48], 'median_ms': ms,
         'p10_ms': ms * 0.9, 'p90_ms': ms * 1.1, 'times_ms': [ms * 0.9, ms, ms * 1.1],
         'peak_rss_gb': rss, 'info': {}}
  if framework == 'peftjax':
    out.update(step_memory={'total': memory}, device_peak_gb=device)
  return out


def test_report_takes_median_over_rounds_and_states_ratios():
  lora = functools.partial(_fake, 'lora', 'peftjax', memory=3e8)
  results = {'lora': [lora(100.0), lora(120.0, rss=1.5), lora(400.0)],
             'full': [_fake('full', 'peftjax', 200.0, rss=2.0, memory=6e8)],
             'torch-lora': [_fake('torch-lora', 'torch', 80.0)],
             'torch-full': [{'name': 'torch-full', 'error': 'exit 1: boom'}]}
  summary = {n: benchmark.summarize(r) for n, r in results.items()}
  assert summary['lora']['median_ms'] == 120.0
  rat = benchmark.ratios(summary)
  assert rat['to_full'] == {'lora': 0.6, 'full': 1.0}
  assert rat['rss_to_full'] == {'lora': 0.75, 'full': 1.0}  # torch-full failed
  assert rat['step_memory_to_full'] == {'lora': 0.5, 'full': 1.0}
  assert rat['device_peak_to_full'] == {}
  assert rat['peftjax_to_torch'] == {'lora': 1.5}
  args = argparse.Namespace(model='minilm', rounds=3, steps=20, warmup=2)
  env = {'batch_shape': [32, 48], 'jax': 'jax x', 'threads': '2 core(s)', 'load_before': '0',
         'load_after': '0', 'wall_s': 1.0, 'busy': None, 'cores_available': 2}
  text = benchmark.report(summary, rat, env, {'lora': 'lora()'}, args)
  rows = _rows(text)
  assert rows['peftjax lora'][:8] == ['10', '120.0', '8.33', '0.600', '1.50', '0.750', '0.300',
                                      '0.500']
  assert rows['torch+PEFT lora'][6:8] == ['—', '—']  # no compiled step in torch
  assert rows['torch+PEFT lora'][-1] == '1.500'
  assert rows['torch+PEFT full'][0].startswith('failed: ')
  assert 'peftjax LoRA ÷ full step time: 0.600' in text
  assert "peftjax peak memory ÷ full fine-tuning's**: lora step memory 0.500, peak RSS 0.750" \
      in text
  assert 'device peak' not in text  # none measured (CPU)
  # On an accelerator, the device's own peak too.
  results = {'lora': [_fake('lora', 'peftjax', 100.0, memory=3e8, device=0.4)],
             'full': [_fake('full', 'peftjax', 200.0, memory=6e8, device=1.6)]}
  summary = {n: benchmark.summarize(r) for n, r in results.items()}
  text = benchmark.report(summary, benchmark.ratios(summary), env, {}, args)
  assert _rows(text)['peftjax lora'][8:10] == ['0.400', '0.250']
  assert 'lora step memory 0.500, device peak 0.250, peak RSS 1.000' in text


@pytest.mark.long  # the benchmark end to end with its torch rows
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


# LoRA r=8 on the 7 projections of 2 layers of TINY_LLAMA (hidden 32, 4 heads of 8, 2 KV
# heads, MLP 64): q, o 8·(32+32); k, v 8·(32+16); gate, up, down 8·(32+64).
TINY_LLAMA_LORA_PARAMS = 2 * 8 * (2 * 64 + 2 * 48 + 3 * 96)


def _lm_bench(*args, timeout=180):
  return _bench('--model', 'tiny-llama', '--methods', 'lora,full', '--warmup', '0', *args,
                timeout=timeout)


@pytest.mark.long
def test_lm_command_reports_tokens_per_second(tmp_path):
  out = tmp_path / 'bench.json'
  proc = _lm_bench('--no-torch', '--json', str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| run | trainable params | tokens/s | step ms (median) | steps/s | ratio to full ' \
         '(time) | peak RSS GB | steps peak RSS GB |' in proc.stdout
  rows = _rows(proc.stdout)
  assert set(rows) == {'peftjax lora', 'peftjax full'}
  assert int(rows['peftjax lora'][0].replace(',', '')) == TINY_LLAMA_LORA_PARAMS
  saved = json.loads(out.read_text())
  assert saved['environment']['batch_shape'] == [8, 16]  # the LM config's batch size
  lora = saved['runs']['lora']
  assert lora['tokens_per_s'] == pytest.approx(8 * 16 * 1e3 / lora['median_ms'])
  assert rows['peftjax lora'][1] == f'{lora["tokens_per_s"]:,.0f}'
  assert 0 < lora['steps_peak_rss_gb'] <= lora['peak_rss_gb']
  assert saved['ratios']['to_full']['full'] == 1.0


def _tiny_llama(rope_theta: float = 10000.0, scale: float = 0.0):
  """TINY_LLAMA at `rope_theta`; `scale` > 0 redraws every weight ~ N(0, scale) (norm scales
  ~ N(1, scale)), so that a wrong mapping shows in the logits."""
  model = build(ml_collections.ConfigDict({**TINY_LLAMA, 'rope_theta': rope_theta}))
  if scale:
    rng = np.random.default_rng(0)
    model = model._replace(params=jax.tree.map(
        lambda x: rng.normal(float(x.ndim == 1), scale, x.shape).astype(np.float32),
        model.params))
  return model


def test_lm_batch_is_the_tasks_prefix_lm_rows():
  config = benchmark.load_config(benchmark.LM_CONFIG, 'tiny-llama')
  assert benchmark.lm_row_length(config) > config.data.length  # paradigm, sentinels, targets
  model = benchmark.first_layers(_tiny_llama(), 1)
  assert model.module.config.num_layers == 1 and 'layers_1' not in model.params
  batch = bench.lm_batch(CausalLM(model, {'train': np.zeros((1, 10), np.int32)}, bos_id=0), 3)
  assert batch['input_ids'].shape == (3, 10) and (batch['segment_ids'] == 1).all()
  assert batch['input_ids'].max() < TINY_LLAMA['vocab_size']
  np.testing.assert_array_equal(batch['prefix'][0], np.arange(10) <= 5)
  np.testing.assert_array_equal(batch['weights'][0], np.arange(10) >= 5)
  np.testing.assert_array_equal(batch['input_ids'][:, 1:], batch['targets'][:, :-1])


def test_llama_twin_loads_our_weights_and_matches_our_logits(tmp_path):
  for module in ('torch', 'transformers', 'peft', 'safetensors'):
    pytest.importorskip(module)
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  config = benchmark.load_config(benchmark.LM_CONFIG, 'tiny-llama')
  hf = benchmark.torch_plan(config, 'tiny-llama')
  assert len(hf['lora']['target_modules']) == 2 * 7
  assert 'model.layers.1.mlp.down_proj' in hf['lora']['target_modules']
  assert (hf['lora']['r'], hf['lora']['lora_alpha'], hf['lora']['lora_dropout']) == (8, 16.0, 0.0)
  full = benchmark.torch_plan(benchmark.load_config(benchmark.LM_CONFIG, 'tiny-llama', '',
                                                    'full'), 'tiny-llama')
  assert full['lora'] is None and 'model.embed_tokens.weight' in full['trainable']
  assert hf['config']['tie_word_embeddings'] and 'lm_head.weight' not in full['trainable']

  model = _tiny_llama(rope_theta=1e5, scale=0.3)  # SmolLM2's RoPE base
  task = CausalLM(model, {'train': np.zeros((1, 24), np.int32)}, bos_id=0)
  directory = bench.export_llama_twin(model, bench.lm_batch(task, 2), tmp_path / 'twin')
  twin, diff = bench_torch.load_llama_twin(directory, transformers, torch)
  assert diff <= bench_torch.LOGITS_ATOL
  assert twin.config.rope_parameters['rope_theta'] == 1e5
  assert sum(p.numel() for p in twin.parameters()) == sum(
      x.size for x in jax.tree.leaves(model.params))

  # Q rows in llama.cpp's interleaved RoPE layout (what smollm2.unpermute undoes): caught.
  path = directory / 'model.safetensors'
  tensors = safetensors.numpy.load_file(str(path))
  q = tensors['model.layers.0.self_attn.q_proj.weight']
  tensors['model.layers.0.self_attn.q_proj.weight'] = np.ascontiguousarray(
      q.reshape(4, 2, 4, 32).swapaxes(1, 2).reshape(q.shape))
  safetensors.numpy.save_file(tensors, str(path), metadata={'format': 'pt'})
  with pytest.raises(ValueError, match="logits differ from peftjax's"):
    bench_torch.load_llama_twin(directory, transformers, torch)


@pytest.mark.long  # the benchmark end to end with its torch rows
def test_lm_torch_twin_trains_what_the_config_trains(tmp_path):
  for module in ('torch', 'transformers', 'peft'):
    pytest.importorskip(module)
  out = tmp_path / 'bench.json'
  proc = _lm_bench('--torch_threads', '1', '--json', str(out), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.loads(out.read_text())
  for method in ('lora', 'full'):
    twin = saved['runs'][f'torch-{method}']
    assert 'error' not in twin, twin['error']
    assert twin['trainable_params'] == saved['runs'][method]['trainable_params']
    assert twin['batch_shape'] == [8, 16] and twin['info']['logits_max_abs_diff'] <= 1e-3
  assert saved['runs']['torch-lora']['trainable_params'] == TINY_LLAMA_LORA_PARAMS
  assert saved['ratios']['tokens_peftjax_to_torch']['lora'] == pytest.approx(
      1 / saved['ratios']['peftjax_to_torch']['lora'])
  assert re.search(r'peftjax ÷ torch tokens/s: lora [\d.]+×', proc.stdout)


def test_a_method_without_its_own_config_file_takes_the_shared_one():
  from experiments.bench import config_module
  assert config_module('lora') == 'configs.minilm_vader_lora'
  assert config_module('sara') == 'configs.minilm_vader:sara'
  config = benchmark.load_config(config_module('sara'), 'tiny')
  assert config.method.name == 'sara' and config.optimizer.lr == pytest.approx(1e-3 * 0.4966,
                                                                               rel=1e-3)
