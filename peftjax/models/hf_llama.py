"""`Llama` as an HF transformers `LlamaForCausalLM` checkpoint: config, tensor names, files.

Our param paths mirror HF module names and our Q/K rows are already in HF's `rotate_half`
layout, so the mapping is a rename and the [in, out] -> [out, in] transpose of kernels.
Written with numpy and safetensors only; `transformers.LlamaForCausalLM.from_pretrained(dir)`
loads the result (the benchmark's torch twin does, and checks its logits against ours).
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import numpy as np

from peftjax.core import paths as P
from peftjax.models.llama import LlamaConfig

WEIGHTS_FILE = 'model.safetensors'

_TOP = {'embed_tokens/embedding': 'model.embed_tokens.weight',
        'norm/scale': 'model.norm.weight', 'lm_head/kernel': 'lm_head.weight'}
_LAYER = re.compile(r'layers_(\d+)/((?:self_attn|mlp)/\w+|\w+layernorm)/(kernel|scale)')


def hf_name(path: str) -> str:
  """The HF state-dict name of a param path: 'layers_0/self_attn/q_proj/kernel' ->
  'model.layers.0.self_attn.q_proj.weight'."""
  if path in _TOP:
    return _TOP[path]
  m = _LAYER.fullmatch(path)
  if m is None:
    raise ValueError(f'{path!r} is not a Llama param path; expected one of {sorted(_TOP)} or '
                     "'layers_{i}/(self_attn|mlp)/<proj>/kernel', 'layers_{i}/<norm>/scale'")
  return f'model.layers.{m[1]}.{m[2].replace("/", ".")}.weight'


def hf_config(config: LlamaConfig) -> dict[str, Any]:
  """The HF `LlamaConfig` fields (config.json) of the same model."""
  return {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
          'vocab_size': config.vocab_size, 'hidden_size': config.hidden_size,
          'intermediate_size': config.intermediate_size,
          'num_hidden_layers': config.num_layers, 'num_attention_heads': config.num_heads,
          'num_key_value_heads': config.num_kv_heads, 'head_dim': config.head_dim,
          'hidden_act': 'silu', 'max_position_embeddings': config.max_length,
          'rms_norm_eps': config.rms_eps, 'rope_theta': config.rope_theta,
          'tie_word_embeddings': config.tie_embeddings, 'attention_bias': False,
          'mlp_bias': False, 'torch_dtype': 'float32'}


def state_dict(params) -> dict[str, np.ndarray]:
  """HF tensors of a plain (unstructured) param tree: float32, kernels as [out, in]."""
  out = {}
  for path, value in P.flatten(params).items():
    value = np.asarray(value, np.float32)
    out[hf_name(path)] = np.ascontiguousarray(value.T if path.endswith('/kernel') else value)
  return out


def save(config: LlamaConfig, params, directory) -> pathlib.Path:
  """Writes `config.json` and `model.safetensors` of `params` into `directory`."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'config.json').write_text(json.dumps(hf_config(config), indent=2) + '\n')
  safetensors.numpy.save_file(state_dict(params), str(directory / WEIGHTS_FILE),
                              metadata={'format': 'pt'})
  return directory
