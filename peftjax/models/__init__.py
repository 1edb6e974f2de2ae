"""A Flax model as the trainer sees it (`Model`), and the bundled ones a config names."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax

from peftjax.core import linen

# A 2-layer, 32-wide random BERT for tests and quick benchmarks (`model.name='bert'`).
TINY_BERT = {'name': 'bert', 'hidden_size': 32, 'num_layers': 2, 'num_heads': 4,
             'intermediate_size': 64}


class Model(NamedTuple):
  """Any `flax.linen` module with its params (pretrained or initial), an id that adapter
  files record, and optionally the logical axis names of each param by slash path (for
  sharding rules, `peftjax.parallel.sharding`; without them params are replicated)."""
  module: nn.Module
  params: Any
  model_id: str
  logical_axes: Callable[[str], tuple] | None = None

  def apply(self, params, *args, rng=None, **kwargs):
    """The module on `params`, which may hold structured leaves (`peftjax.core.linen`);
    `rng` is the 'dropout' rng of a training call."""
    return linen.apply(self.module, params, *args, rng=rng, **kwargs)


def build(config, seed: int = 0) -> Model:
  """`name='minilm'`: pretrained MiniLM-L6; `name='bert'`: random init of the given sizes
  (MiniLM's vocabulary), for tests and ablations. `remat=True` (any model) recomputes each
  block's activations in the backward pass. Both run `(input_ids, attention_mask, train=)`
  and return the last hidden states. `name='t5'`: random init of a T5 encoder-decoder of the
  given `T5Config` fields (`peftjax.models.t5`; e.g. `t5.SMALL_CPU`, `t5.TINY_CPU`)."""
  from peftjax.models import minilm
  from peftjax.models.bert import Bert, BertConfig
  remat = bool(config.get('remat', False))
  if config.name == 'minilm':
    bert_config, params = minilm.load_minilm()
    module = Bert(bert_config, remat)
    return Model(module, params, minilm.MODEL_ID, module.logical_axes)
  if config.name == 'bert':
    sizes = {k: v for k, v in config.items() if k not in ('name', 'remat')}
    bert_config = BertConfig(vocab_size=minilm.load_tokenizer().get_vocab_size(), **sizes)
    module = Bert(bert_config, remat)
    ids = jax.numpy.zeros((1, 8), jax.numpy.int32)
    params = module.init(jax.random.key(seed), ids, ids + 1)['params']
    return Model(module, params, f'random-bert-seed{seed}', module.logical_axes)
  if config.name == 't5':
    from peftjax.models import t5
    sizes = {k: v for k, v in config.items() if k not in ('name', 'remat')}
    return t5.init(t5.T5Config(**sizes), seed, remat=remat)
  raise ValueError(f"unknown model {config.name!r}; expected 'minilm', 'bert' or 't5'")
