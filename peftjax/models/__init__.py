"""Bundled Flax models and the backbone a config names."""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax

from peftjax.models.bert import Bert, BertConfig, mean_pool


class Backbone(NamedTuple):
  """A text encoder: the Flax module, its params, its tokenizer and an id for adapter files."""
  module: nn.Module
  params: Any
  tokenizer: Any
  model_id: str

  def embed(self, params, batch, *, train: bool = False, rng=None):
    """Mean-pooled sentence embeddings of a batch."""
    hidden = self.module.apply({'params': params}, batch['input_ids'], batch['attention_mask'],
                               train=train, rngs={'dropout': rng} if train else None)
    return mean_pool(hidden, batch['attention_mask'])

  @property
  def width(self) -> int:
    return self.module.config.hidden_size

  def logical_axes(self, path: str) -> tuple:
    """The logical axis names of the param at slash `path` (for sharding rules)."""
    return self.module.logical_axes(path)


def build(config, max_length: int = 64, seed: int = 0) -> Backbone:
  """`name='minilm'`: pretrained MiniLM-L6; `name='bert'`: random init of the given sizes
  (with MiniLM's tokenizer), for tests and ablations. `remat=True` (either model)
  recomputes each block's activations in the backward pass."""
  from peftjax.models import minilm
  tokenizer = minilm.load_tokenizer(max_length=max_length)
  remat = bool(config.get('remat', False))
  if config.name == 'minilm':
    bert_config, params = minilm.load_minilm()
    return Backbone(Bert(bert_config, remat), params, tokenizer, minilm.MODEL_ID)
  if config.name == 'bert':
    sizes = {k: v for k, v in config.items() if k not in ('name', 'remat')}
    bert_config = BertConfig(vocab_size=tokenizer.get_vocab_size(), **sizes)
    module = Bert(bert_config, remat)
    ids = jax.numpy.zeros((1, 8), jax.numpy.int32)
    params = module.init(jax.random.key(seed), ids, ids + 1)['params']
    return Backbone(module, params, tokenizer, f'random-bert-seed{seed}')
  raise ValueError(f"unknown model {config.name!r}; expected 'minilm' or 'bert'")
