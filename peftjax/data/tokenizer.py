"""Byte-level BPE tokenizers with T5's special ids, trained on the project's corpora.

Layout of a vocabulary of size V with n sentinels (T5 convention):
- 0 `<pad>`, 1 `</s>` (EOS), 2 `<unk>` (never produced: every byte has a token),
- 3, 4, ... the paradigm tokens (`[NLU]`, `[NLG]`, `[S2S]` by default, as in UL2),
- the learned byte-level BPE tokens (256 byte tokens, then merges),
- the sentinels at the end in descending order: `<extra_id_0>` = V - 1, ...,
  `<extra_id_{n-1}>` = V - n.
Special tokens are matched whole in the input; `decode(encode(text).ids) == text` for any
text without them. No post-processor: callers append EOS themselves (`corpus.token_chunks`).
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from peftjax.data import assets, corpus as corpus_lib
from peftjax.io import files

PAD, EOS, UNK = '<pad>', '</s>', '<unk>'
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
PARADIGMS = ('[NLU]', '[NLG]', '[S2S]')
_FORMAT = 1  # Bump when train_bpe builds tokenizers differently.


def sentinel(i: int) -> str:
  """The i-th T5 sentinel token, `<extra_id_{i}>`."""
  return f'<extra_id_{i}>'


def train_bpe(texts: Iterable[str], vocab_size: int, *, num_sentinels: int = 100,
              extra_special: Sequence[str] = PARADIGMS) -> tokenizers.Tokenizer:
  """A byte-level BPE tokenizer of exactly `vocab_size` tokens trained on `texts`.

  Deterministic: the same texts and settings give the same tokenizer JSON.

  Raises:
    ValueError: if the settings leave no room for merges, or the texts support fewer merges
      than the vocabulary needs.
  """
  special = [PAD, EOS, UNK, *extra_special]
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  learned = vocab_size - num_sentinels
  if num_sentinels < 0 or learned <= len(special) + len(alphabet):
    raise ValueError(f'vocab_size={vocab_size} must exceed {len(special)} special tokens + '
                     f'{len(alphabet)} bytes + num_sentinels={num_sentinels}')
  if len(set(special)) != len(special) or any(t.startswith('<extra_id_') for t in special):
    raise ValueError(f'special tokens must be distinct and not sentinels, got {special}')
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=learned, special_tokens=special,
                                initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  if tok.get_vocab_size() != learned:
    raise ValueError(f'the texts gave {tok.get_vocab_size()} BPE tokens, expected {learned} '
                     f'(vocab_size={vocab_size} - {num_sentinels} sentinels): use a smaller '
                     'vocab_size or more text')
  # Added one after another, so <extra_id_{n-1}> gets V - n and <extra_id_0> gets V - 1.
  tok.add_special_tokens([tokenizers.AddedToken(sentinel(i), special=True, normalized=False)
                          for i in reversed(range(num_sentinels))])
  got = [special_id(tok, t) for t in special]
  if got != list(range(len(special))) or tok.get_vocab_size() != vocab_size:
    raise AssertionError(f'special ids {got}, vocab {tok.get_vocab_size()}: layout broken')
  return tok


def special_id(tokenizer: tokenizers.Tokenizer, token: str) -> int:
  """The id of `token`; ValueError if the vocabulary does not have it."""
  i = tokenizer.token_to_id(token)
  if i is None:
    raise ValueError(f'token {token!r} is not in the vocabulary '
                     f'({tokenizer.get_vocab_size()} tokens)')
  return i


def sentinel_ids(tokenizer: tokenizers.Tokenizer) -> list[int]:
  """Ids of `<extra_id_0>`, `<extra_id_1>`, ... (descending for `train_bpe` tokenizers)."""
  out = []
  while (i := tokenizer.token_to_id(sentinel(len(out)))) is not None:
    out.append(i)
  return out


def tokenizer_path(corpus: str = 'austen', vocab_size: int = 8192, *,
                   num_sentinels: int = 100,
                   extra_special: Sequence[str] = PARADIGMS) -> pathlib.Path:
  """Where `corpus_tokenizer` caches these settings: `<cache>/tokenizers/<hash>.json`."""
  key = json.dumps([corpus_lib.corpus_version(corpus), 'train', vocab_size, num_sentinels,
                    list(extra_special), tokenizers.__version__, _FORMAT])
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return assets.cache_dir() / 'tokenizers' / f'{corpus}-{vocab_size}-{digest}.json'


def corpus_tokenizer(corpus: str = 'austen', vocab_size: int = 8192, *,
                     num_sentinels: int = 100,
                     extra_special: Sequence[str] = PARADIGMS) -> tokenizers.Tokenizer:
  """`train_bpe` on the corpus's train split, trained once and then read from the cache.

  The cache key holds the corpus version, the settings and the `tokenizers` version.
  """
  path = tokenizer_path(corpus, vocab_size, num_sentinels=num_sentinels,
                        extra_special=extra_special)
  if path.exists():
    return tokenizers.Tokenizer.from_file(str(path))
  tok = train_bpe(corpus_lib.documents(corpus, 'train')[:], vocab_size,
                  num_sentinels=num_sentinels, extra_special=extra_special)
  files.atomic_write_bytes(path, tok.to_str().encode('utf-8'))
  return tok
