"""Language modelling tasks: causal LM, UL2 denoising, and text-to-text classification.

Every task here trains next-token cross-entropy on the target tokens of packed rows
(`peftjax.data.packing`) and runs on either architecture (`data.format`):

- `'prefix_lm'`: a decoder called as `module(input_ids, segment_ids=, positions=, prefix=,
  train=)` returning logits (the bundled `Llama`), inputs and targets in one row;
- `'encoder_decoder'`: a model called as `module(encoder_ids, decoder_input_ids,
  encoder_segment_ids=, decoder_segment_ids=, encoder_positions=, decoder_positions=, train=)`
  (the bundled `T5`).

Tasks:
- `CausalLM` ('causal_lm'): a corpus cut into rows of `data.length` tokens; val/test loss is
  the held-out per-token loss (perplexity = exp(loss)).
- `Denoising` ('ul2'): UL2's mixture of denoisers (`peftjax.objectives.ul2`) over a corpus
  cut into chunks of `data.length` raw tokens; `data.examples_per_row` examples are packed per
  row. Training corrupts each chunk afresh every epoch (seeded by seed, epoch and chunk);
  val/test use one fixed corruption, so the held-out denoising loss is comparable across runs.
- `TextClassification` ('text_classification'): VADER sentences as text-to-text: inputs are
  the paradigm token `data.paradigm` (mode switching, e.g. '[NLU]'; '' for none) and the
  sentence, targets the class word and EOS; accuracy ranks the class words' first tokens.

Tokenizers (`data.tokenizer`): 'smollm2' (the pretrained model's), or 'bpe': the project's
byte-level BPE trained on `data.corpus` with `data.vocab_size` (`peftjax.data.tokenizer`).
Sentinels and paradigm tokens are the tokenizer's own where it has them (`<extra_id_i>`,
`[NLU]`...); a tokenizer without them (SmolLM2) lends its last ids (`special_ids`), highest
first, as T5 places its sentinels: the denoising stage teaches the model their new meaning.
"""
from __future__ import annotations

import abc
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax.data import packing
from peftjax.models import Model, build
from peftjax.objectives import ul2
from peftjax.tasks.base import Task

FORMATS = ('prefix_lm', 'encoder_decoder')
_EVAL_SEED = 20_221_005  # the fixed corruption of held-out splits


# ---------------------------------------------------------------- tokens
def load_tokenizer(data):
  """The tokenizer `data.tokenizer` names (see the module docstring)."""
  if data.tokenizer == 'smollm2':
    from peftjax.models import smollm2
    return smollm2.load_tokenizer()
  if data.tokenizer == 'bpe':
    from peftjax.data import tokenizer
    return tokenizer.corpus_tokenizer(data.corpus, data.vocab_size)
  raise ValueError(f"unknown data.tokenizer {data.tokenizer!r}; expected 'smollm2' or 'bpe'")


def special_ids(tok, paradigm_tokens, num_sentinels: int) -> tuple[list[int], dict[str, int]]:
  """(sentinel ids, highest first; {paradigm token: id}) of `tok`: its own tokens where it
  has them; else UL2's paradigm tokens take its last ids ('[NLU]', '[NLG]', '[S2S]' from the
  top, the same in every stage) and the sentinels the ids below them."""
  vocab, canonical = tok.get_vocab_size(), list(ul2.PARADIGM_TOKENS.values())
  paradigm = {}
  for t in paradigm_tokens:
    if tok.token_to_id(t) is not None:
      paradigm[t] = tok.token_to_id(t)
    elif t in canonical:
      paradigm[t] = vocab - 1 - canonical.index(t)
    else:
      raise ValueError(f'paradigm token {t!r} is not in the tokenizer; add it there, or use '
                       f'one of {canonical}')
  own = [tok.token_to_id(f'<extra_id_{i}>') for i in range(num_sentinels)]
  if None not in own:
    return own, paradigm
  if own[0] is not None:
    raise ValueError(f'the tokenizer has {own.index(None)} sentinels (<extra_id_i>); '
                     f'{num_sentinels} are needed: shorter chunks, or more sentinels')
  top = vocab - 1 - len(canonical)
  return list(range(top, top - num_sentinels, -1)), paradigm


def eos_id(tok) -> int:
  for t in ('</s>', '<|endoftext|>', '<|im_end|>', '<eos>'):
    if tok.token_to_id(t) is not None:
      return tok.token_to_id(t)
  raise ValueError('the tokenizer has no end-of-sequence token (</s>, <|endoftext|>, <eos>)')


# ---------------------------------------------------------------- the shared part
class _PackedLM(Task):
  """Next-token loss on the target tokens of packed rows; metrics: per-token loss and
  accuracy. Subclasses build `examples(split, index, seed, epoch)` and the row lengths."""
  selection = 'loss'
  maximize = False
  examples_per_row = 1

  def __init__(self, model: Model, fmt: str, rows: dict[str, int], *, bos_id: int,
               pad_id: int = 0):
    if fmt not in FORMATS:
      raise ValueError(f'unknown data.format {fmt!r}; expected one of {FORMATS}')
    self.model, self.format, self.rows = model, fmt, rows
    self.bos_id, self.pad_id = bos_id, pad_id

  @abc.abstractmethod
  def num_examples(self, split: str) -> int:
    """Examples in `split`."""

  @abc.abstractmethod
  def examples(self, split: str, index: np.ndarray, seed: int | None, epoch: int) -> list:
    """`(inputs, targets)` token arrays of the examples at `index` (training: seeded by
    `seed` and `epoch`; `seed=None`: the fixed evaluation form)."""

  def num_batches(self, split, batch_size):
    return -(-self.num_examples(split) // (batch_size * self.examples_per_row))

  def batches(self, split, batch_size, *, seed=None, epoch=0, start=0,
              rows=slice(None)) -> Iterator[dict]:
    n, per = self.num_examples(split), batch_size * self.examples_per_row
    order = np.arange(n) if seed is None else np.random.default_rng([seed, epoch]).permutation(n)
    for b in range(start, self.num_batches(split, batch_size)):
      packed = self.pack(self.examples(split, order[b * per:(b + 1) * per], seed, epoch))
      if len(packed['targets']) > batch_size:  # cannot happen: rows hold examples_per_row
        raise AssertionError(f'{len(packed["targets"])} rows for a batch of {batch_size}')
      yield {k: _fill(v, batch_size)[rows] for k, v in packed.items()}

  def pack(self, examples) -> dict:
    if self.format == 'prefix_lm':
      return packing.prefix_lm(examples, self.rows['length'], bos_id=self.bos_id,
                               pad_id=self.pad_id)[0]
    return packing.encoder_decoder(examples, self.rows['inputs'], self.rows['targets'],
                                   decoder_start_id=self.bos_id, pad_id=self.pad_id)[0]

  def batch_shapes(self, batch_size):
    example = self.pack([(np.zeros(1, np.int32), np.zeros(1, np.int32))])
    return [{k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype)
             for k, v in example.items()}]

  def logits(self, params, batch, *, rng=None):
    train = rng is not None
    if self.format == 'prefix_lm':
      return self.model.apply(params, batch['input_ids'], segment_ids=batch['segment_ids'],
                              positions=batch['positions'], prefix=batch['prefix'],
                              train=train, rng=rng)
    return self.model.apply(
        params, batch['encoder_ids'], batch['decoder_input_ids'],
        encoder_segment_ids=batch['encoder_segment_ids'],
        decoder_segment_ids=batch['decoder_segment_ids'],
        encoder_positions=batch['encoder_positions'],
        decoder_positions=batch['decoder_positions'], train=train, rng=rng)

  def predictions(self, params, head, batch, *, rng=None):
    return self.logits(params, batch, rng=rng), batch['weights']

  def loss(self, params, head, batch, *, rng=None):
    losses = _token_losses(self.logits(params, batch, rng=rng), batch['targets'])
    w = batch['weights']
    return jnp.sum(losses * w) / jnp.maximum(jnp.sum(w), 1.0)

  def eval_sums(self, params, head, batch):
    logits = self.logits(params, batch)
    w = batch['weights']
    correct = (jnp.argmax(logits, -1) == batch['targets']).astype(jnp.float32)
    return {'loss': jnp.sum(_token_losses(logits, batch['targets']) * w),
            'accuracy': jnp.sum(correct * w), 'count': jnp.sum(w)}

  def calibration_mask(self, batch):
    if self.format == 'prefix_lm':
      return (batch['segment_ids'] > 0).astype(jnp.float32)
    return None  # encoder and decoder rows differ in length: every position counts


def unigram_loss(task: _PackedLM, batch_size: int = 64, *, fit: str = 'train',
                 measure: str = 'val') -> float:
  """The per-token loss on `measure`'s targets of the best model that ignores its inputs: the
  target-token frequencies of `fit` (add-one smoothed; train corrupted as in epoch 0)."""
  vocab = task.model.module.config.vocab_size
  counts = np.ones(vocab)
  for batch in task.batches(fit, batch_size, seed=0 if fit == 'train' else None):
    np.add.at(counts, batch['targets'].ravel(), batch['weights'].ravel())
  logp = np.log(counts / counts.sum())
  total = weight = 0.0
  for batch in task.batches(measure, batch_size):
    total -= float(np.sum(logp[batch['targets']] * batch['weights']))
    weight += float(batch['weights'].sum())
  return total / weight


def _token_losses(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def _fill(x: np.ndarray, rows: int) -> np.ndarray:
  """`x` padded with all-zero rows (segment 0, weight 0) to `rows` rows."""
  out = np.zeros((rows, *x.shape[1:]), x.dtype)
  out[:len(x)] = x
  return out


def _chunks(data, tok, eos_id):
  """Each split of `data.corpus` in rows of `data.length` tokens: the first `data.limit` rows
  of each (0: all), val and test at most `data.eval_limit` (0: all)."""
  from peftjax.data import corpus
  out = {}
  for split in ('train', 'val', 'test'):
    c = corpus.token_chunks(data.corpus, split, tok, data.length, eos_id=eos_id)
    limits = [n for n in (data.limit, 0 if split == 'train' else data.eval_limit) if n]
    out[split] = c[:min(limits)] if limits else c
  return out


def _model_and_tokens(config, model):
  tok = load_tokenizer(config.data)
  return model or build(config.model, config.seed), tok, eos_id(tok)


# ---------------------------------------------------------------- tasks
class CausalLM(_PackedLM):
  """Next-token prediction over a corpus in rows of `length` tokens (decoder-only)."""

  def __init__(self, model: Model, chunks: dict[str, np.ndarray], *, bos_id: int):
    length = int(next(iter(chunks.values())).shape[1])
    super().__init__(model, 'prefix_lm', {'length': length}, bos_id=bos_id)
    self.chunks = chunks

  @classmethod
  def from_config(cls, config, model: Model | None = None) -> CausalLM:
    model, tok, eos = _model_and_tokens(config, model)
    return cls(model, _chunks(config.data, tok, eos), bos_id=eos)

  def num_examples(self, split):
    return len(self.chunks[split])

  def examples(self, split, index, seed, epoch):
    return [(np.zeros(0, np.int32), self.chunks[split][i]) for i in index]


class Denoising(_PackedLM):
  """UL2's mixture of denoisers over chunks of `length` raw tokens."""

  def __init__(self, model: Model, chunks: dict[str, np.ndarray], mixture: ul2.Mixture,
               fmt: str, *, sentinel_ids, paradigm_ids, bos_id: int,
               examples_per_row: int = 1):
    length = int(next(iter(chunks.values())).shape[1])
    self.mixture, self.sentinel_ids, self.paradigm_ids = mixture, sentinel_ids, paradigm_ids
    self.examples_per_row, self.chunks = examples_per_row, chunks
    # Rows sized so that `examples_per_row` of the longest corruption always fit: first fit
    # then opens a new row only when every open one holds that many examples.
    sizes = [ul2.corrupted_lengths(length, d) for d in mixture.denoisers]
    if fmt == 'prefix_lm':  # an S split moves tokens between inputs and targets
      totals = [length + (d.paradigm is not None) if d.kind == 'S' else a + b
                for d, (a, b) in zip(mixture.denoisers, sizes)]
      rows = {'length': examples_per_row * max(totals)}
    else:
      rows = {'inputs': examples_per_row * max(a for a, _ in sizes),
              'targets': examples_per_row * max(b for _, b in sizes)}
    super().__init__(model, fmt, rows, bos_id=bos_id)

  @classmethod
  def from_config(cls, config, model: Model | None = None) -> Denoising:
    d = config.data
    model, tok, eos = _model_and_tokens(config, model)
    mixture = ul2.make_mixture(d.mixture, weights=tuple(d.weights) or None,
                               paradigm_tokens=None if d.paradigm else {})
    spans = max(ul2.num_sentinels(d.length, x) for x in mixture.denoisers)
    sentinels, paradigm = special_ids(tok, mixture.paradigm_tokens, spans)
    return cls(model, _chunks(d, tok, eos), mixture, d.format, sentinel_ids=sentinels,
               paradigm_ids=paradigm, bos_id=eos, examples_per_row=d.examples_per_row)

  def num_examples(self, split):
    return len(self.chunks[split])

  def examples(self, split, index, seed, epoch):
    out = []
    for i in index:
      rng = np.random.default_rng([_EVAL_SEED, int(i)] if seed is None else
                                  [seed, epoch, int(i)])
      inputs, targets, _ = self.mixture.sample(self.chunks[split][i], rng,
                                               sentinel_ids=self.sentinel_ids,
                                               paradigm_ids=self.paradigm_ids)
      out.append((inputs, targets))
    return out


class TextClassification(_PackedLM):
  """Sentences to class words (text-to-text), one example per row; accuracy by the class
  words' first tokens at the first target position."""
  selection = 'accuracy'
  maximize = True

  def __init__(self, model: Model, data: dict, class_words: list[np.ndarray], fmt: str, *,
               max_length: int, bos_id: int, prefix_ids=()):
    firsts = [int(w[0]) for w in class_words]
    if len(set(firsts)) != len(firsts):
      raise ValueError(f'the class words must start with different tokens, got {firsts}')
    self.data, self.class_words = data, class_words
    self.class_first = np.asarray(firsts, np.int32)
    self.prefix_ids = np.asarray(prefix_ids, np.int32)
    longest = max(len(w) for w in class_words)
    rows = ({'length': max_length + longest} if fmt == 'prefix_lm' else
            {'inputs': max_length, 'targets': longest})
    super().__init__(model, fmt, rows, bos_id=bos_id)
    self.max_length = max_length

  @classmethod
  def from_config(cls, config, model: Model | None = None) -> TextClassification:
    from peftjax.data import vader
    d = config.data
    model, tok, eos = _model_and_tokens(config, model)
    prefix = [special_ids(tok, [d.paradigm], 0)[1][d.paradigm]] if d.paradigm else []
    data = {}
    for name, split in vader.load_split(d.domain).items():
      n = d.limit or len(split)
      texts = [tok.encode(t).ids for t in split.texts[:n]]
      data[name] = (texts, split.labels[:n])
    words = [np.asarray(tok.encode(w).ids + [eos], np.int32) for w in d.class_words]
    return cls(model, data, words, d.format, max_length=d.max_length, bos_id=eos,
               prefix_ids=prefix)

  def num_examples(self, split):
    return len(self.data[split][1])

  def examples(self, split, index, seed, epoch):
    texts, labels = self.data[split]
    keep = self.max_length - len(self.prefix_ids)
    return [(np.concatenate([self.prefix_ids, np.asarray(texts[i][:keep], np.int32)]),
             self.class_words[labels[i]]) for i in index]

  def batches(self, split, batch_size, **kwargs):
    for batch in super().batches(split, batch_size, **kwargs):
      first = np.argmax(batch['weights'] > 0, axis=1)  # each row's first target position
      yield batch | {'label': self.label_of(batch['targets'][np.arange(len(first)), first]),
                     'first': first.astype(np.int32),
                     'row_weight': (batch['weights'].sum(1) > 0).astype(np.float32)}

  def label_of(self, first_tokens):
    return np.argmax(first_tokens[:, None] == self.class_first[None], axis=1).astype(np.int32)

  def batch_shapes(self, batch_size):
    rows = jax.ShapeDtypeStruct((batch_size,), np.int32)
    return [s | {'label': rows, 'first': rows,
                 'row_weight': jax.ShapeDtypeStruct((batch_size,), np.float32)}
            for s in super().batch_shapes(batch_size)]

  def eval_sums(self, params, head, batch):
    logits = self.logits(params, batch)
    at_first = jnp.take_along_axis(logits, batch['first'][:, None, None], axis=1)[:, 0]
    pred = jnp.argmax(at_first[:, self.class_first], axis=-1)
    w = batch['row_weight']
    losses = _token_losses(logits, batch['targets']) * batch['weights']
    return {'loss': jnp.sum(losses.sum(1) / jnp.maximum(batch['weights'].sum(1), 1.0) * w),
            'accuracy': jnp.sum((pred == batch['label']) * w), 'count': jnp.sum(w)}
