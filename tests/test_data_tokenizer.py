"""Byte-level BPE with T5's special ids and sentinels; the cached corpus tokenizer."""
from __future__ import annotations

import pytest

from peftjax.data import austen, corpus, tokenizer

V = 1000


@pytest.fixture(scope='module')
def texts():
  return [c.text for c in austen.chapters('val')]


@pytest.fixture(scope='module')
def tok(texts):
  return tokenizer.train_bpe(texts, V)


def test_special_ids_follow_t5(tok):
  assert tok.get_vocab_size() == V
  specials = ['<pad>', '</s>', '<unk>', '[NLU]', '[NLG]', '[S2S]']
  assert [tokenizer.special_id(tok, t) for t in specials] == list(range(6))
  assert (tokenizer.PAD_ID, tokenizer.EOS_ID, tokenizer.UNK_ID) == (0, 1, 2)
  assert tok.encode('[S2S] Emma</s>').ids[0] == 5 and tok.encode('[S2S] Emma</s>').ids[-1] == 1
  with pytest.raises(ValueError, match="'<mask>' is not in the vocabulary"):
    tokenizer.special_id(tok, '<mask>')


def test_sentinels_descend_at_the_end(tok):
  ids = tokenizer.sentinel_ids(tok)
  assert ids == list(range(V - 1, V - 101, -1))
  assert tok.id_to_token(V - 1) == '<extra_id_0>' and tok.id_to_token(V - 100) == '<extra_id_99>'
  assert max(tok.get_vocab().values()) == V - 1
  assert tok.encode('a <extra_id_7> b').ids[2] == V - 8
  few = tokenizer.train_bpe(['some text for a tiny vocabulary'] * 50, 280, num_sentinels=3,
                            extra_special=())
  assert tokenizer.sentinel_ids(few) == [279, 278, 277]
  assert tokenizer.special_id(few, '<unk>') == 2 and few.token_to_id('[NLU]') is None


def test_round_trip_without_unknown_tokens(tok):
  paragraphs = [p for c in austen.load() for p in c.paragraphs]
  sample = paragraphs + ['Ω≈ç√ naïve café 😀 \t tab\r\n', '  two  spaces ', '']
  encoded = tok.encode_batch(sample)
  assert tok.decode_batch([e.ids for e in encoded]) == sample
  assert not any(tokenizer.UNK_ID in e.ids for e in encoded)
  # The byte fallback works: emoji are several byte tokens, not <unk>.
  assert len(tok.encode('😀').ids) == 4


def test_training_is_deterministic(tok, texts):
  assert tokenizer.train_bpe(texts, V).to_str() == tok.to_str()
  assert tokenizer.train_bpe(texts, V + 1).to_str() != tok.to_str()


def test_bad_sizes_are_errors():
  with pytest.raises(ValueError, match='must exceed 6 special tokens'):
    tokenizer.train_bpe(['abc'], 300)
  with pytest.raises(ValueError, match='the texts gave'):
    tokenizer.train_bpe(['abc abc'], 2000)


def test_corpus_tokenizer_trains_once_and_caches(tmp_path, monkeypatch):
  monkeypatch.setenv('PEFTJAX_CACHE', str(tmp_path))
  corpus._prepared.cache_clear()
  first = tokenizer.corpus_tokenizer('austen', 600, num_sentinels=10)
  path = tokenizer.tokenizer_path('austen', 600, num_sentinels=10)
  assert path.parent == tmp_path / 'tokenizers' and path.read_text() == first.to_str()
  expected = tokenizer.train_bpe(corpus.documents('austen', 'train')[:], 600, num_sentinels=10)
  assert first.to_str() == expected.to_str()

  def fail(*args, **kwargs):
    raise AssertionError('trained again')

  monkeypatch.setattr(tokenizer, 'train_bpe', fail)
  assert tokenizer.corpus_tokenizer('austen', 600, num_sentinels=10).to_str() == first.to_str()
  for other in [dict(vocab_size=600, num_sentinels=9), dict(vocab_size=601, num_sentinels=10),
                dict(vocab_size=600, num_sentinels=10, extra_special=('[NLU]',))]:
    with pytest.raises(AssertionError, match='trained again'):  # Other settings: a cache miss.
      tokenizer.corpus_tokenizer('austen', **other)
  assert [p.name for p in path.parent.iterdir()] == [path.name]  # No temporary files left.
  corpus._prepared.cache_clear()
