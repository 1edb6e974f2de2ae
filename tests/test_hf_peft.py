"""HF PEFT LoRA files (peftjax.io.hf_peft): names, layouts, scales and round trips without
torch; with torch, transformers and peft installed (`pip install -e '.[test,interop]'`), the
real library loads our exports and we load its adapters, outputs compared at atol 1e-4."""
from __future__ import annotations

import functools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import peftjax as pj
from peftjax.core import calib as C
from peftjax.core import paths as P
from peftjax.core.adapter import describe_targets
from peftjax.io import hf_peft
from peftjax.io.hf_peft import HfPeftError, UnsupportedAdapterError
from peftjax.models.bert import Bert, BertConfig, mean_pool
from peftjax.models.llama import Llama, LlamaConfig

BERT = BertConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24)
LLAMA = LlamaConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=24)
IDS = np.array([[3, 9, 27, 5, 1, 0], [7, 2, 11, 0, 0, 0]], np.int32)
MASK = (IDS > 0).astype(np.int32)
ATOL = 1e-4


@functools.lru_cache(maxsize=None)
def bert_params(hidden: int = 16):
  cfg = BERT if hidden == 16 else BertConfig(64, hidden, 2, 2, 24)
  return jax.jit(Bert(cfg).init)(jax.random.key(0), IDS, MASK)['params']


@functools.lru_cache(maxsize=None)
def llama_params():
  return jax.jit(Llama(LLAMA).init)(jax.random.key(0), IDS)['params']


def random_lora(params, targets, seed=1, **kwargs):
  """An adapter with random non-zero A and B."""
  adapter = pj.lora(targets, init_b='gaussian', **kwargs)
  frozen, state = adapter.init(jax.random.key(seed), params)
  return adapter, frozen, state


def read(directory):
  config = json.loads((directory / hf_peft.CONFIG_FILE).read_text())
  return config, safetensors.numpy.load_file(str(directory / hf_peft.WEIGHTS_FILE))


def file_delta(directory, name: str) -> np.ndarray:
  """ΔW [out, in] of module `name` as PEFT computes it from the files: scale * B @ A, scale =
  alpha / r or alpha / sqrt(r) (the export writes full module names into the patterns)."""
  config, tensors = read(directory)
  a = tensors[f'base_model.model.{name}.lora_A.weight']
  b = tensors[f'base_model.model.{name}.lora_B.weight']
  key = name.removeprefix('bert.')
  r = config['rank_pattern'].get(key, config['r'])
  alpha = config['alpha_pattern'].get(key, config['lora_alpha'])
  assert a.shape[0] == b.shape[1] == r
  return (alpha / (np.sqrt(r) if config['use_rslora'] else r)) * (b @ a)


def merged_delta(adapter, frozen, state, params, path) -> np.ndarray:
  """The adapter's change of the kernel at `path` from the ORIGINAL base, transposed."""
  merged = P.flatten(pj.merge(adapter, frozen, state))[path]
  return np.asarray(merged - P.flatten(params)[path]).T


# ------------------------------------------------------------------------------ no torch
@pytest.mark.parametrize('rslora', [False, True])
def test_export_names_layouts_and_scales(tmp_path, rslora):
  params = bert_params()
  adapter, frozen, state = random_lora(
      params, ['attention/(query|value)/kernel', 'intermediate/kernel'], rank=4, alpha=8,
      rslora=rslora, rank_pattern={'layer_1/attention/query': 2}, alpha_pattern={'value': 3.0})
  hf_peft.export_adapter(tmp_path, adapter, frozen, state, params, base_model='tiny')
  config, tensors = read(tmp_path)
  assert config['peft_type'] == 'LORA' and config['task_type'] == 'FEATURE_EXTRACTION'
  assert (config['r'], config['lora_alpha'], config['use_rslora']) == (4, 8, rslora)
  assert config['target_modules'] == ['intermediate.dense', 'query', 'value']
  assert config['rank_pattern'] == {'encoder.layer.1.attention.self.query': 2}
  assert config['alpha_pattern'] == {f'encoder.layer.{i}.attention.self.value': 3
                                     for i in range(2)}
  assert config['base_model_name_or_path'] == 'tiny' and config['modules_to_save'] is None
  name = 'encoder.layer.0.intermediate.dense'  # in 16, out 24: [r, in] and [out, r]
  assert tensors[f'base_model.model.{name}.lora_A.weight'].shape == (4, 16)
  assert tensors[f'base_model.model.{name}.lora_B.weight'].shape == (24, 4)
  assert len(tensors) == 2 * 6
  names = hf_peft.module_names(params)
  for path in state:
    np.testing.assert_allclose(file_delta(tmp_path, names[path]),
                               merged_delta(adapter, frozen, state, params, path), atol=1e-6)


def test_bert_head_is_the_classifier_of_sequence_classification(tmp_path):
  params = bert_params()
  adapter, frozen, state = random_lora(params, ['layer_0/attention/query/kernel'], rank=2)
  head = {'kernel': np.arange(32, dtype=np.float32).reshape(16, 2), 'bias': np.ones(2, np.float32)}
  hf_peft.export_adapter(tmp_path, adapter, frozen, state, params, head=head)
  config, tensors = read(tmp_path)
  assert config['task_type'] == 'SEQ_CLS' and config['modules_to_save'] == ['classifier']
  assert config['target_modules'] == ['layer.0.attention.self.query']
  assert set(tensors) == {
      'base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight',
      'base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight',
      'base_model.model.classifier.weight', 'base_model.model.classifier.bias'}
  np.testing.assert_array_equal(tensors['base_model.model.classifier.weight'], head['kernel'].T)
  _, _, _, loaded, _ = hf_peft.import_adapter(tmp_path, params)
  np.testing.assert_array_equal(loaded['kernel'], head['kernel'])


def test_llama_names_and_targets(tmp_path):
  params = llama_params()
  adapter, frozen, state = random_lora(params, ['(q_proj|v_proj|down_proj)/kernel'], rank=2)
  hf_peft.export_adapter(tmp_path, adapter, frozen, state, params)
  config, tensors = read(tmp_path)
  assert config['task_type'] == 'CAUSAL_LM'
  assert config['target_modules'] == ['down_proj', 'q_proj', 'v_proj']
  assert tensors['base_model.model.model.layers.1.mlp.down_proj.lora_A.weight'].shape == (2, 24)
  assert tensors['base_model.model.model.layers.1.mlp.down_proj.lora_B.weight'].shape == (16, 2)


@pytest.mark.parametrize('model', ['bert', 'llama'])
@pytest.mark.parametrize('rslora', [False, True])
def test_round_trip_is_exact(tmp_path, model, rslora):
  params = bert_params() if model == 'bert' else llama_params()
  targets = ['attention/(query|key)/kernel', 'layer_1/output/kernel'] if model == 'bert' else [
      'self_attn/(k_proj|o_proj)/kernel', 'layers_1/mlp/up_proj']
  adapter, frozen, state = random_lora(params, targets, rank=4, alpha=6, dropout=0.1,
                                       rslora=rslora, rank_pattern={'layer(s)?_1': 3},
                                       alpha_pattern={'(key|k_proj)': 5.0})
  hf_peft.export_adapter(tmp_path, adapter, frozen, state, params)
  loaded, frozen2, state2, head, config = hf_peft.import_adapter(tmp_path, params)
  assert head is None and loaded.config['rslora'] == rslora and loaded.config['dropout'] == 0.1
  assert set(state2) == set(state)
  for path in state:
    np.testing.assert_array_equal(state2[path]['a'], state[path]['a'])
    np.testing.assert_array_equal(state2[path]['b'], state[path]['b'])
  assert describe_targets(loaded, frozen2, state2) == describe_targets(adapter, frozen, state)
  assert config['r'] == 3  # the most common rank; the others in rank_pattern
  assert len(config['rank_pattern']) == 2 and set(config['rank_pattern'].values()) == {4}


def tiny_calibration():
  params = bert_params()
  ids = jax.random.randint(jax.random.key(3), (8, 6), 1, 64)
  batches = [{'input_ids': ids[i::2], 'attention_mask': jnp.ones((4, 6), jnp.int32)}
             for i in range(2)]
  forward = lambda p, b: Bert(BERT).apply({'params': p}, b['input_ids'], b['attention_mask'])
  loss = lambda p, b: jnp.mean(mean_pool(forward(p, b), b['attention_mask'])[:, 0] ** 2)
  return C.Calibration(forward, params, batches, loss_fn=loss,
                       mask_fn=lambda b: b['attention_mask'])


@pytest.mark.parametrize('method', ['pissa', 'milora', 'corda', 'lora_ga'])
def test_rebased_methods_export_as_rank_2r_lora_on_the_original_base(tmp_path, method):
  params = bert_params()
  adapter = pj.from_config({'method': method, 'targets': ['attention/value/kernel',
                                                          'layer_1/intermediate/kernel'],
                            'rank': 2, 'alpha': 4.0})
  frozen, state = adapter.init(jax.random.key(0), params,
                               calib=tiny_calibration() if method in ('corda', 'lora_ga') else None)
  state = jax.tree.map(lambda x: x + 0.05, state)  # "trained"
  hf_peft.export_adapter(tmp_path, adapter, frozen, state, params)
  config, _ = read(tmp_path)
  assert config['r'] == 4
  names = hf_peft.module_names(params)
  for path in state:
    np.testing.assert_allclose(file_delta(tmp_path, names[path]),
                               merged_delta(adapter, frozen, state, params, path), atol=2e-5)
  # On a base other than the one it was initialised on, a residual cannot be converted.
  other = jax.tree.map(lambda x: x * 1.01, params)
  if method in ('corda', 'lora_ga'):
    with pytest.raises(HfPeftError, match='A0 @ B0'):
      hf_peft.export_adapter(tmp_path / 'x', adapter, frozen, state, other)


def write_peft(directory, config: dict, tensors: dict):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / hf_peft.CONFIG_FILE).write_text(json.dumps(config))
  safetensors.numpy.save_file(tensors, str(directory / hf_peft.WEIGHTS_FILE))


def valid_peft_file(tmp_path):
  params = bert_params()
  adapter, frozen, state = random_lora(params, ['layer_0/attention/query/kernel'], rank=2)
  hf_peft.export_adapter(tmp_path / 'ok', adapter, frozen, state, params)
  return read(tmp_path / 'ok')


@pytest.mark.parametrize('change, error, match', [
    ({'peft_type': 'LOHA'}, UnsupportedAdapterError, "peft_type 'LOHA'"),
    ({'peft_type': 'IA3'}, UnsupportedAdapterError, 'only LORA'),
    ({'use_dora': True}, UnsupportedAdapterError, 'DoRA'),
    ({'bias': 'all'}, UnsupportedAdapterError, 'bias'),
    ({'layer_replication': [[0, 1]]}, UnsupportedAdapterError, 'layer replication'),
    ({'init_lora_weights': 'pissa'}, UnsupportedAdapterError, 'residual base'),
    ({'init_lora_weights': 'loftq'}, UnsupportedAdapterError, 'plain'),
    ({'r': 3}, HfPeftError, 'rank 2 but the config gives 3'),
    ({'target_modules': ['query', 'value']}, HfPeftError, 'no lora_A'),
])
def test_import_rejects_what_it_cannot_compute(tmp_path, change, error, match):
  config, tensors = valid_peft_file(tmp_path)
  write_peft(tmp_path / 'bad', config | change, tensors)
  with pytest.raises(error, match=match):
    hf_peft.import_adapter(tmp_path / 'bad', bert_params())


def test_import_rejects_another_base_model_and_missing_files(tmp_path):
  config, tensors = valid_peft_file(tmp_path)
  with pytest.raises(HfPeftError, match='modules this model lacks'):
    hf_peft.import_adapter(tmp_path / 'ok', llama_params())
  with pytest.raises(HfPeftError, match=r'needs \[r, 8\]'):
    hf_peft.import_adapter(tmp_path / 'ok', bert_params(hidden=8))
  renamed = {k.replace('layer.0', 'layer.7'): v for k, v in tensors.items()}
  write_peft(tmp_path / 'deeper', config, renamed)
  with pytest.raises(HfPeftError, match='modules this model lacks'):
    hf_peft.import_adapter(tmp_path / 'deeper', bert_params())
  (tmp_path / 'ok' / hf_peft.WEIGHTS_FILE).unlink()
  with pytest.raises(HfPeftError, match='no adapter_model.safetensors'):
    hf_peft.import_adapter(tmp_path / 'ok', bert_params())
  with pytest.raises(HfPeftError, match='adapter_config.json is missing'):
    hf_peft.import_adapter(tmp_path / 'nothing', bert_params())
  assert issubclass(HfPeftError, pj.AdapterFileError)


def test_export_rejects_other_methods_and_leaves_nothing(tmp_path):
  params = bert_params()
  sorsa = pj.from_config({'method': 'sorsa', 'targets': ['query/kernel'], 'rank': 2})
  frozen, state = sorsa.init(jax.random.key(0), params)
  with pytest.raises(UnsupportedAdapterError, match='LoRA-shaped'):
    hf_peft.export_adapter(tmp_path / 'new', sorsa, frozen, state, params)
  assert not (tmp_path / 'new').exists() and list(tmp_path.iterdir()) == []
  adapter, frozen, state = random_lora(llama_params(), ['q_proj/kernel'], rank=2)
  (tmp_path / 'old').mkdir()
  (tmp_path / 'old' / 'keep').write_text('x')
  with pytest.raises(UnsupportedAdapterError, match='LLaMA task head'):
    hf_peft.export_adapter(tmp_path / 'old', adapter, frozen, state, llama_params(),
                           head={'kernel': np.zeros((16, 2)), 'bias': np.zeros(2)})
  embed, frozen, state = random_lora(llama_params(), ['embed_tokens/embedding'], rank=2)
  with pytest.raises(UnsupportedAdapterError, match='not a linear layer'):
    hf_peft.export_adapter(tmp_path / 'old', embed, frozen, state, llama_params())
  assert [p.name for p in tmp_path.iterdir()] == ['old']
  assert [p.name for p in (tmp_path / 'old').iterdir()] == ['keep']


@pytest.mark.long  # a trainer run, the export command and two more runs: about a minute
def test_a_run_exports_and_its_export_evaluates_and_trains_on(tmp_path):
  """experiments.export writes the run's adapter and head; evaluated as an HF adapter it
  measures what the run measured; a run started from it (--init_adapter) starts there."""
  from peftjax.train.loop import evaluate_adapter, train  # pylint: disable=g-import-not-at-top
  from tiny_runs import tiny  # pylint: disable=g-import-not-at-top
  run = train(tiny(epochs=1), tmp_path / 'run')
  out = subprocess.run([sys.executable, '-m', 'experiments.export',
                        f'--workdir={tmp_path / "run"}', '--to=hf', str(tmp_path / 'hf')],
                       capture_output=True, text=True, timeout=300,
                       cwd=pathlib.Path(__file__).parents[1])
  assert out.returncode == 0, out.stderr[-2000:]
  config, tensors = read(tmp_path / 'hf')
  assert config['task_type'] == 'SEQ_CLS' and 'base_model.model.classifier.weight' in tensors
  assert config['base_model_name_or_path'] == 'random-bert-seed0'
  measured = evaluate_adapter(tiny(), tmp_path / 'hf', ('test',))['test']
  np.testing.assert_allclose(measured['accuracy'], run['test_accuracy'], atol=1e-6)
  np.testing.assert_allclose(measured['loss'], run['test_loss'], atol=1e-5)
  again = tiny(epochs=1, eval_at_start=True, max_steps=1)
  again.method.init = str(tmp_path / 'hf')
  train(again, tmp_path / 'again')
  start = json.loads((tmp_path / 'again' / 'metrics.jsonl').read_text().splitlines()[0])
  assert start['step'] == 0
  np.testing.assert_allclose(start['accuracy'], run['val_accuracy'], atol=1e-6)
  again.method.name = 'pissa'
  with pytest.raises(ValueError, match='continues as lora'):
    train(again, tmp_path / 'wrong')


# ---------------------------------------------------------------- against the real library
def _torch():
  pytest.importorskip('peft')
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  return torch, transformers, peft


@functools.lru_cache(maxsize=None)
def minilm():
  from peftjax.models import minilm as loader  # pylint: disable=g-import-not-at-top
  config, params = loader.load_minilm()
  tok = loader.load_tokenizer()
  rows = [tok.encode(s).ids for s in ['A man is eating food.', 'Hi!',
                                      'Quantum chromodynamics describes the strong force.']]
  width = max(map(len, rows))
  ids = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
  return config, params, ids, (ids > 0).astype(np.int32)


@functools.lru_cache(maxsize=None)
def bert_forward(config):
  """One compiled forward for every plain (merged) param tree of `config`."""
  return jax.jit(lambda params, ids, mask: Bert(config).apply({'params': params}, ids, mask))


def bert_hidden(config, adapter, frozen, state, ids, mask):
  merged = pj.materialize(adapter.apply(frozen, state))
  return np.asarray(bert_forward(config)(merged, ids, mask))


MINILM_TARGETS = ['layer_[05]/attention/(query|value)/kernel', 'layer_1/(intermediate|output)/kernel']


@pytest.mark.parametrize('method', ['rslora+head', 'pissa'])
def test_peft_loads_our_minilm_adapter(tmp_path, minilm_dir, method):
  torch, transformers, peft = _torch()
  config, params, ids, mask = minilm()
  if method == 'pissa':
    adapter = pj.pissa('layer_[05]/attention/(query|value)/kernel', rank=4, alpha=8.0)
    frozen, state = adapter.init(jax.random.key(0), params)
    state = jax.tree.map(lambda x: x * 1.1, state)
    head = None
  else:
    adapter, frozen, state = random_lora(params, MINILM_TARGETS, rank=4, alpha=8, rslora=True,
                                         rank_pattern={'layer_5/attention/query': 8},
                                         alpha_pattern={'layer_1': 3.0})
    head = {'kernel': np.asarray(jax.random.normal(jax.random.key(2), (384, 2))),
            'bias': np.array([0.1, -0.2], np.float32)}
  hf_peft.export_adapter(tmp_path, adapter, frozen, state, params, head=head,
                         base_model=str(minilm_dir))
  ours = bert_hidden(config, adapter, frozen, state, ids, mask)
  cls = transformers.BertForSequenceClassification if head else transformers.BertModel
  model = cls.from_pretrained(minilm_dir, attn_implementation='eager').eval()
  model = peft.PeftModel.from_pretrained(model, tmp_path).eval()
  bert = model.base_model.model.bert if head else model.base_model.model
  with torch.no_grad():
    theirs = bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    theirs = theirs.last_hidden_state.numpy()
  base = bert_hidden(config, pj.probe(), params, {}, ids, mask)
  assert np.abs(ours - base).max() > 0.1  # the adapter changes the output
  print(f'{method}: max abs difference of the last hidden state {np.abs(ours - theirs).max():.2e}')
  np.testing.assert_allclose(ours, theirs, atol=ATOL)
  if head:
    pooled = torch.tensor(np.asarray(mean_pool(theirs, mask)))
    with torch.no_grad():
      logits = model.base_model.model.classifier(pooled).numpy()
    expected = np.asarray(mean_pool(ours, mask)) @ head['kernel'] + head['bias']
    np.testing.assert_allclose(logits, expected, atol=ATOL)


def test_we_load_a_peft_minilm_adapter(tmp_path, minilm_dir):
  torch, transformers, peft = _torch()
  config, params, ids, mask = minilm()
  model = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation='eager')
  lora = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                         target_modules=['query', 'value', 'intermediate.dense'],
                         layers_to_transform=[0, 3],
                         rank_pattern={'encoder.layer.3.attention.self.query': 8},
                         alpha_pattern={'value': 3})
  model = peft.get_peft_model(model, lora).eval()
  model.save_pretrained(tmp_path)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids),
                   attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  adapter, frozen, state, _, _ = hf_peft.import_adapter(tmp_path, params)
  assert len(state) == 6 and state['encoder/layer_3/attention/query/kernel']['a'].shape == (384, 8)
  ours = bert_hidden(config, adapter, frozen, state, ids, mask)
  print(f'peft MiniLM adapter: max abs difference {np.abs(ours - theirs).max():.2e}')
  np.testing.assert_allclose(ours, theirs, atol=ATOL)


def test_llama_both_ways(tmp_path):
  torch, transformers, peft = _torch()
  from peftjax.models import hf_llama  # pylint: disable=g-import-not-at-top
  params = llama_params()
  hf_llama.save(LLAMA, params, tmp_path / 'base')
  ids = IDS[:, :5] + 1
  logits = lambda a, f, s: np.asarray(Llama(LLAMA).apply({'params': pj.materialize(a.apply(f, s))},
                                                         ids))
  # Ours in PEFT.
  adapter, frozen, state = random_lora(params, ['self_attn/(q|k|v|o)_proj', 'mlp/'], rank=4,
                                       alpha=8, rank_pattern={'layers_1/mlp/down': 2})
  hf_peft.export_adapter(tmp_path / 'ours', adapter, frozen, state, params)
  model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'base').eval()
  model = peft.PeftModel.from_pretrained(model, tmp_path / 'ours').eval()
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids)).logits.numpy()
  ours = logits(adapter, frozen, state)
  print(f'LLaMA export: max abs difference of the logits {np.abs(ours - theirs).max():.2e}')
  np.testing.assert_allclose(ours, theirs, atol=ATOL)
  # PEFT's in ours.
  model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'base')
  lora = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                         target_modules='all-linear',
                         rank_pattern={'model.layers.1.mlp.down_proj': 2},
                         alpha_pattern={'q_proj': 2})
  model = peft.get_peft_model(model, lora).eval()
  model.save_pretrained(tmp_path / 'theirs')
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids)).logits.numpy()
  adapter, frozen, state, _, _ = hf_peft.import_adapter(tmp_path / 'theirs', params)
  assert len(state) == 14
  ours = logits(adapter, frozen, state)
  print(f'LLaMA import: max abs difference of the logits {np.abs(ours - theirs).max():.2e}')
  np.testing.assert_allclose(ours, theirs, atol=ATOL)


@pytest.mark.long  # SmolLM2-135M written as HF weights and run in both libraries: minutes
def test_peft_loads_our_smollm2_adapter(tmp_path):
  torch, transformers, peft = _torch()
  from peftjax.models import hf_llama, smollm2  # pylint: disable=g-import-not-at-top
  config, params = smollm2.load_smollm2()
  hf_llama.save(config, params, tmp_path / 'base')
  adapter, frozen, state = random_lora(params, ['self_attn/(q|v)_proj', 'layers_2/mlp/'],
                                       rank=4, alpha=8, rslora=True)
  hf_peft.export_adapter(tmp_path / 'ours', adapter, frozen, state, params,
                         base_model=smollm2.MODEL_ID)
  ids = np.array([[504, 3575, 282, 4649, 314]], np.int32)
  forward = jax.jit(lambda p: Llama(config).apply({'params': p}, ids))
  base = np.asarray(forward(params))
  ours = np.asarray(forward(pj.materialize(adapter.apply(frozen, state))))
  model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'base').eval()
  with torch.no_grad():
    their_base = model(input_ids=torch.tensor(ids)).logits.numpy()
    model = peft.PeftModel.from_pretrained(model, tmp_path / 'ours').eval()
    theirs = model(input_ids=torch.tensor(ids)).logits.numpy()
  change = np.abs((ours - base) - (theirs - their_base)).max()
  print(f'SmolLM2: max abs difference of the logits {np.abs(ours - theirs).max():.2e}, of '
        f'the adapter\'s change of them {change:.2e} (change up to {np.abs(ours - base).max():.2f})')
  assert np.abs(ours - base).max() > 0.1
  np.testing.assert_allclose(ours, theirs, atol=1e-3)  # the base models differ by 2.4e-4
  assert change < 1e-3
