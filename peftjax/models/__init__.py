"""A Flax model as the trainer sees it (`Model`), and the bundled ones a config names."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax

from peftjax.core import linen

# A 2-layer, 32-wide random BERT for tests and quick benchmarks (`model.name='bert'`).
TINY_BERT = {'name': 'bert', 'hidden_size': 32, 'num_layers': 2, 'num_heads': 4,
             'intermediate_size': 64}
# A 2-layer, 32-wide random LLaMA decoder for tests (`model.name='llama'`).
TINY_LLAMA = {'name': 'llama', 'vocab_size': 64, 'hidden_size': 32, 'num_layers': 2,
              'num_heads': 4, 'num_kv_heads': 2, 'intermediate_size': 64, 'max_length': 128}
# A 2-layer, 16-wide random ViT (patch 7) for tests (`model.name='vit'`).
TINY_VIT = {'name': 'vit', 'patch_size': 7, 'hidden_size': 16, 'num_layers': 2, 'num_heads': 2,
            'intermediate_size': 32}


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
  """The model `config.name` names, with params from the file `config.init` if it is set
  (e.g. a previous stage's merged result, `peftjax.io.params_file`)."""
  model = _build(config, seed)
  if config.get('init'):
    from peftjax.io.params_file import load_params
    model = model._replace(params=load_params(config.init, model.params),
                           model_id=f'{model.model_id}+{config.init}')
  return model


def _build(config, seed: int) -> Model:
  """`name='minilm'`: pretrained MiniLM-L6; `name='bert'`: random init of the given sizes
  (MiniLM's vocabulary), for tests and ablations. Both run `(input_ids, attention_mask, train=)`
  and return the last hidden states. `name='smollm2'`: pretrained SmolLM2-135M-Instruct;
  `name='llama'`: a random LLaMA of the given `LlamaConfig` sizes. Both run
  `(input_ids, segment_ids=, positions=, prefix=, train=)` and return next-token logits.
  `name='t5'`: random init of a T5 encoder-decoder of the given `T5Config` fields
  (`peftjax.models.t5`). `name='vit'`: the ViT pretrained on Fashion-MNIST with
  `checkpoint='fashion_mnist'`, else a random ViT of the given `ViTConfig` fields; it runs
  `(images, train=)` and returns pooled features (`peftjax.models.vit`). `remat=True` (any
  model) recomputes each block's activations in the backward pass."""
  from peftjax.models import minilm
  from peftjax.models.bert import Bert, BertConfig
  remat = bool(config.get('remat', False))
  if config.name == 'minilm':
    bert_config, params = minilm.load_minilm()
    module = Bert(bert_config, remat)
    return Model(module, params, minilm.MODEL_ID, module.logical_axes)
  if config.name == 'bert':
    bert_config = BertConfig(vocab_size=minilm.load_tokenizer().get_vocab_size(),
                             **_sizes(config))
    module = Bert(bert_config, remat)
    ids = jax.numpy.zeros((1, 8), jax.numpy.int32)
    params = module.init(jax.random.key(seed), ids, ids + 1)['params']
    return Model(module, params, f'random-bert-seed{seed}', module.logical_axes)
  if config.name in ('smollm2', 'llama'):
    return _build_llama(config, seed, remat)
  if config.name == 't5':
    from peftjax.models import t5
    return t5.init(t5.T5Config(**_sizes(config)), seed, remat=remat)
  if config.name == 'vit':
    from peftjax.models import vit
    return vit.from_config(config, seed)
  raise ValueError(f"unknown model {config.name!r}; expected 'minilm', 'bert', 'smollm2', "
                   "'llama', 't5' or 'vit'")


def _build_llama(config, seed: int, remat: bool) -> Model:
  from peftjax.models import smollm2
  from peftjax.models.llama import Llama, LlamaConfig
  if config.name == 'smollm2':
    llama_config, params = smollm2.load_smollm2()
    module = Llama(llama_config, remat)
    return Model(module, params, smollm2.MODEL_ID, module.logical_axes)
  module = Llama(LlamaConfig(**_sizes(config)), remat)
  ids = jax.numpy.zeros((1, 8), jax.numpy.int32)
  params = jax.jit(module.init)(jax.random.key(seed), ids)['params']
  return Model(module, params, f'random-llama-seed{seed}', module.logical_axes)


def _sizes(config) -> dict:
  """A random model's shape fields: the config's keys but `name`, `remat` and `init`."""
  return {k: v for k, v in config.items() if k not in ('name', 'remat', 'init')}
