"""The torch side of `experiments.bench`, and the measuring that both sides share.

  python -m experiments.bench_torch SPEC_JSON   (a child of experiments.bench)

Imports neither jax nor peftjax, so that the torch twin can run in any interpreter that has
torch, transformers, peft and numpy (`--torch_python`). Two twins, each on the same weights
as its peftjax run: `BertModel` + mean pooling + `Linear(width, 2)` (MiniLM), and
`LlamaForCausalLM` from the HF checkpoint that the parent exported from our params
(`peftjax.models.hf_llama`), whose logits must match ours before anything is timed.
"""
from __future__ import annotations

import json
import math
import pathlib
import resource
import sys
import time

import numpy as np

RESULT_MARK = 'BENCH_RESULT '
NUM_CLASSES = 2  # VADER sentiment: rating > 0.
TORCH = 'torch'
LOGITS_ATOL = 1e-3
# Files of an exported Llama twin besides the HF checkpoint: the timed batch and our logits.
BATCH_FILE, REFERENCE_FILE = 'batch.npz', 'reference.npz'


def make_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
  """Random token ids in [1000, vocab) (past BERT's special and unused ids), full mask."""
  rng = np.random.default_rng(seed)
  low = min(1000, vocab_size - 1)
  return {'input_ids': rng.integers(low, vocab_size, (batch_size, seq_len), dtype=np.int32),
          'attention_mask': np.ones((batch_size, seq_len), np.int32),
          'labels': rng.integers(0, NUM_CLASSES, (batch_size,), dtype=np.int32),
          'weights': np.ones((batch_size,), np.float32)}


def stats(times_s) -> dict:
  ms = np.asarray(times_s) * 1e3
  p10, p50, p90 = np.percentile(ms, [10, 50, 90])
  return {'median_ms': float(p50), 'p10_ms': float(p10), 'p90_ms': float(p90),
          'times_ms': [round(float(t), 3) for t in ms]}


def peak_rss_gb() -> float:
  """This process's peak resident set size in GB (10^9 bytes): its own high-water mark
  (VmHWM); `ru_maxrss` where /proc is missing (that one starts at the parent's peak)."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      kib = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
  except (OSError, StopIteration):
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kib * 1024 / 1e9


def start_steps_phase() -> tuple[float, bool]:
  """(peak RSS so far, whether the high-water mark was reset): resets it to the current RSS
  (Linux `clear_refs`), so that `peak_rss_gb()` afterwards is the peak of what follows."""
  before = peak_rss_gb()
  try:
    with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
      f.write('5')
    return before, True
  except OSError:
    return before, False


def timed(step, spec: dict) -> dict:
  """Runs `step()` `spec['warmup']` times untimed, then `spec['steps']` times timed (it must
  return the loss when done); the timing stats, both peaks and the last loss."""
  before, reset = start_steps_phase()
  for _ in range(spec['warmup']):
    step()
  times = []
  for _ in range(spec['steps']):
    tic = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - tic)
  steps_peak = peak_rss_gb()
  return {**stats(times), 'peak_rss_gb': max(before, steps_peak),
          'steps_peak_rss_gb': steps_peak if reset else None, 'final_loss': float(loss)}


# The torch twins.


def _bert(spec, torch, transformers, peft):
  hf = spec['hf']
  if hf.get('path'):
    bert = transformers.BertModel.from_pretrained(hf['path'], add_pooling_layer=False)
  else:
    bert = transformers.BertModel(transformers.BertConfig(**hf['config']),
                                  add_pooling_layer=False)
  bert = _adapt(bert, hf, peft)
  head = torch.nn.Linear(bert.config.hidden_size, NUM_CLASSES)
  head.train()
  batch = {k: torch.from_numpy(v) for k, v in make_batch(
      spec['batch_size'], spec['seq_len'], bert.config.vocab_size).items()}
  mask = batch['attention_mask'].unsqueeze(-1).float()

  def loss_fn():
    hidden = bert(input_ids=batch['input_ids'],
                  attention_mask=batch['attention_mask']).last_hidden_state
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.cross_entropy(head(pooled), batch['labels'].long())

  return bert, [*bert.parameters(), *head.parameters()], loss_fn, batch['input_ids'].shape, {}


def load_llama_twin(directory, transformers, torch):
  """The exported checkpoint in `directory` as `LlamaForCausalLM` (SDPA attention), and the
  largest difference of its logits from ours on the reference tokens; raises ValueError
  above `LOGITS_ATOL`."""
  model = transformers.LlamaForCausalLM.from_pretrained(
      str(directory), attn_implementation='sdpa', dtype=torch.float32)
  ref = np.load(pathlib.Path(directory) / REFERENCE_FILE)
  model.eval()
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(ref['input_ids']).long(),
                   use_cache=False).logits.numpy()
  diff = float(np.max(np.abs(logits - ref['logits'])))
  if not diff <= LOGITS_ATOL:
    raise ValueError(f'the torch twin\'s logits differ from peftjax\'s by up to {diff:.3g} '
                     f'(expected <= {LOGITS_ATOL:g}): its weights or config do not match')
  return model, diff


def _llama(spec, torch, transformers, peft):
  hf = spec['hf']
  model, diff = load_llama_twin(hf['path'], transformers, torch)
  model = _adapt(model, hf, peft)
  data = np.load(pathlib.Path(hf['path']) / BATCH_FILE)
  ids, targets = (torch.from_numpy(data[k]).long() for k in ('input_ids', 'targets'))
  weights = torch.from_numpy(data['weights']).reshape(-1)

  def loss_fn():  # HF's causal mask; the same next-token targets and weights as ours.
    logits = model(input_ids=ids, use_cache=False).logits
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction='none')
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)

  return model, list(model.parameters()), loss_fn, ids.shape, {'logits_max_abs_diff': diff}


def _adapt(model, hf: dict, peft):
  """Freezes `model`, then adds HF PEFT LoRA (`hf['lora']`) or unfreezes `hf['trainable']`."""
  model.requires_grad_(False)
  if hf['lora'] is not None:
    model = peft.get_peft_model(model, peft.LoraConfig(**hf['lora']))
  trainable = set(hf['trainable'])
  for name, p in model.named_parameters():
    if name.removeprefix('base_model.model.') in trainable:
      p.requires_grad_(True)
  model.train()
  return model


def _lr_factor(opt: dict, total_steps: int):
  """optax's `warmup_cosine_decay_schedule` from 0 (or constant) as a factor of the LR."""
  if opt.get('schedule', 'constant') != 'cosine':
    return lambda step: 1.0
  warmup = opt.get('warmup_steps', 0)
  decay = max(total_steps, warmup + 1) - warmup
  return lambda step: (step / warmup if step < warmup else
                       0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay)))


def measure(spec: dict) -> dict:
  """Times the torch twin's train step; `spec['hf']` comes from `peftjax.benchmark.torch_plan`."""
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  tic = time.perf_counter()
  torch.set_num_threads(spec['threads'])
  torch.manual_seed(spec['seed'])
  build = _llama if spec.get('kind') == 'llama' else _bert
  model, params, loss_fn, shape, info = build(spec, torch, transformers, peft)
  params = [p for p in params if p.requires_grad]
  opt = spec['optimizer']
  optimizer = torch.optim.AdamW(params, lr=opt['lr'], betas=(opt['b1'], opt['b2']),
                                eps=opt['eps'], weight_decay=opt['weight_decay'])
  schedule = torch.optim.lr_scheduler.LambdaLR(
      optimizer, _lr_factor(opt, spec['warmup'] + spec['steps']))

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    if opt.get('clip_norm'):
      torch.nn.utils.clip_grad_norm_(params, opt['clip_norm'])
    optimizer.step()
    schedule.step()
    return loss.item()

  setup_s = time.perf_counter() - tic
  measured = timed(step, spec)
  return {
      'name': spec['name'], 'framework': TORCH, 'method': spec['method'],
      'trainable_params': int(sum(p.numel() for p in params)), 'batch_shape': list(shape),
      **measured, 'setup_s': setup_s,
      'info': {'torch': torch.__version__, 'transformers': transformers.__version__,
               'peft': peft.__version__, 'torch_threads': torch.get_num_threads(),
               'attn_implementation': getattr(model.config, '_attn_implementation', None),
               **info},
  }


if __name__ == '__main__':
  print(RESULT_MARK + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
