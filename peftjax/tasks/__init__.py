"""Tasks by name: what a config's `task` selects (see `base.Task` for the contract)."""
from __future__ import annotations

from peftjax.tasks.base import Task
from peftjax.tasks.classification import SentenceClassification
from peftjax.tasks.image_classification import ImageClassification
from peftjax.tasks.lm import CausalLM, Denoising, TextClassification

REGISTRY = {'sentence_classification': SentenceClassification, 'causal_lm': CausalLM,
            'ul2': Denoising, 'text_classification': TextClassification,
            'image_classification': ImageClassification}


def build(config, model=None) -> Task:
  """The task `config.task` names, from `config` (on `model` if given, else the config's)."""
  if config.task not in REGISTRY:
    raise ValueError(f'unknown task {config.task!r}; known: {sorted(REGISTRY)}')
  return REGISTRY[config.task].from_config(config, model)
