"""Language-model experiment blocks shared by the UL2 configs: a UL2 denoising stage and a
text-to-text VADER sentiment stage on any model, with every key the LM tasks read.

COMMAND: (a base for configs/ul2_t5_austen.py and configs/ul2r_smollm2_lora.py)
"""
import ml_collections

from configs import minilm_vader


def _experiment(task: str, model: dict, data: dict, method: dict):
  c = minilm_vader.get_config('full')  # the trainer's keys with their defaults
  c.task = task
  c.model = ml_collections.ConfigDict({'init': '', 'remat': False, **model})
  c.data = ml_collections.ConfigDict(data)
  c.method = ml_collections.ConfigDict({'init': '', **method})
  return c


def ul2(model: dict, method: dict, *, fmt: str, tokenizer: str, length: int,
        mixture: str = 'ul2', corpus: str = 'austen', vocab_size: int = 8192):
  """UL2 denoising of `corpus` in chunks of `length` raw tokens (`peftjax.tasks.lm`)."""
  return _experiment('ul2', model, {
      'corpus': corpus, 'tokenizer': tokenizer, 'vocab_size': vocab_size, 'length': length,
      'format': fmt, 'mixture': mixture,
      'weights': (),  # one per denoiser; () = the preset's
      'paradigm': True,  # prepend each denoiser's paradigm token ([NLU], [NLG], [S2S])
      'examples_per_row': 1, 'limit': 0, 'eval_limit': 0}, method)


def causal_lm(model: dict, method: dict, *, tokenizer: str, length: int,
              corpus: str = 'austen', vocab_size: int = 8192):
  """Next-token prediction over `corpus` in rows of `length` tokens (`peftjax.tasks.lm`)."""
  return _experiment('causal_lm', model, {
      'corpus': corpus, 'tokenizer': tokenizer, 'vocab_size': vocab_size, 'length': length,
      'limit': 0, 'eval_limit': 0}, method)


def sentiment(model: dict, method: dict, *, fmt: str, tokenizer: str, paradigm: str = '[NLU]',
              corpus: str = 'austen', vocab_size: int = 8192):
  """VADER movie-review sentiment as text-to-text: sentence -> 'negative' / 'positive'."""
  return _experiment('text_classification', model, {
      'name': 'vader', 'domain': 'movie', 'tokenizer': tokenizer, 'corpus': corpus,
      'vocab_size': vocab_size, 'class_words': ('negative', 'positive'),
      'paradigm': paradigm,  # the mode-switching token before every input ('' for none)
      'format': fmt, 'max_length': 64, 'limit': 0}, method)


def chain(**stages):
  """A config of stages run in the order given (`peftjax.train.stages`)."""
  c = ml_collections.ConfigDict()
  c.stage_order = tuple(stages)
  c.stages = ml_collections.ConfigDict(stages)
  return c
