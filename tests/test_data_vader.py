"""Tests of the VADER data: parsing, the fixed split, tokenisation and batching."""
from __future__ import annotations

import numpy as np
import pytest
import tokenizers

from peftjax.data import vader


@pytest.fixture(scope='module')
def movie(vader_dir):
  return vader.load_split('movie', vader_dir)


@pytest.fixture(scope='module')
def tokenizer(minilm_dir):
  return tokenizers.Tokenizer.from_file(str(minilm_dir / 'tokenizer.json'))


def test_parser(tmp_path):
  lines = ['10\t1.5\tten, with a tab\there', '9\t-0.25\tnine caf\u00e9 \x85 still nine',
           '2\t0\tzero', '100\t0.05\thundred', '']
  (tmp_path / vader.DOMAINS['tweets']).write_bytes('\r\n'.join(lines).encode())
  rows = vader.load_domain('tweets', tmp_path)
  assert list(rows.ids) == ['9', '10', '100']
  assert rows.texts == ['nine caf\u00e9 \x85 still nine', 'ten, with a tab\there', 'hundred']
  assert rows.ratings.dtype == np.float32 and rows.labels.dtype == np.int32
  np.testing.assert_allclose(rows.ratings, [-0.25, 1.5, 0.05])
  assert list(rows.labels) == [0, 1, 1]
  assert len(vader.load_domain('tweets', tmp_path, drop_zero=False)) == 4


def test_parser_errors(tmp_path):
  path = tmp_path / vader.DOMAINS['nyt']
  path.write_text('1_1\t0.5\tok\n1_2 0.5 no tabs\n')
  with pytest.raises(ValueError, match=':2: expected'):
    vader.load_domain('nyt', tmp_path)
  path.write_text('1_a\t0.5\tbad id\n')
  with pytest.raises(ValueError, match='not integers'):
    vader.load_domain('nyt', tmp_path)
  path.write_text('1_1\t0.5\tok\n1_2\thigh\tbad rating\n')
  with pytest.raises(ValueError, match=r"nytEditorialSnippets_GroundTruth.txt:2: rating 'high'"):
    vader.load_domain('nyt', tmp_path)
  with pytest.raises(ValueError, match='known: movie, tweets, amazon, nyt'):
    vader.load_domain('imdb', tmp_path)


def test_split_sizes():
  assert vader.split_sizes(10568) == (8454, 1056, 1058)
  assert vader.split_sizes(9) == (7, 0, 2)


def test_movie_rows(vader_dir):
  everything = vader.load_domain('movie', vader_dir, drop_zero=False)
  assert len(everything) == 10605
  assert (everything.ratings == 0).sum() == 37
  rows = vader.load_domain('movie', vader_dir)
  assert len(rows) == 10568
  assert (rows.labels == 1).sum() == 5242 and (rows.labels == 0).sum() == 5326
  assert list(rows.ids[:3]) == ['1', '2', '3']  # Numeric order, not '1', '10', '100'.
  assert (np.diff(rows.ids.astype(int)) > 0).all()
  np.testing.assert_array_equal(rows.labels, rows.ratings > 0)


def test_movie_split(movie, vader_dir):
  assert {k: len(v) for k, v in movie.items()} == {'train': 8454, 'val': 1056, 'test': 1058}
  ids = [set(movie[k].ids) for k in vader.SPLITS]
  assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
  assert set().union(*ids) == set(vader.load_domain('movie', vader_dir).ids)
  again = vader.load_split('movie', vader_dir)
  for k in vader.SPLITS:
    np.testing.assert_array_equal(again[k].ids, movie[k].ids)
    assert again[k].texts == movie[k].texts
    assert 0.45 < movie[k].labels.mean() < 0.55
    np.testing.assert_array_equal(movie[k].labels, movie[k].ratings > 0)
  # The first rows of the fixed permutation, as a guard against a changed sort or seed.
  assert list(movie['train'].ids[:3]) == ['8205', '8222', '2467']
  assert list(movie['test'].ids[:3]) == ['9427', '6220', '4382']


@pytest.mark.parametrize('domain, n, first', [
    ('tweets', 4196, '1'), ('amazon', 3610, '1_1'), ('nyt', 4946, '1_1')])
def test_other_domains(vader_dir, domain, n, first):
  rows = vader.load_domain(domain, vader_dir)
  assert len(rows) == n and rows.ids[0] == first
  keys = [tuple(map(int, i.split('_'))) for i in rows.ids]
  assert keys == sorted(keys)  # The amazon file lists '263_3' after '263_25'.
  assert sum(len(s) for s in vader.load_split(domain, vader_dir).values()) == n


def test_encode_stats(movie, tokenizer):
  texts = [t for k in vader.SPLITS for t in movie[k].texts]
  padding = tokenizer.padding
  lengths = np.array([len(t) for t in vader.encode(tokenizer, texts, max_length=None)])
  assert abs(lengths.mean() - 26.9) < 0.05
  assert np.percentile(lengths, 95) == 46 and lengths.max() == 79
  tokens = vader.encode(tokenizer, texts)
  assert all(t.dtype == np.int32 for t in tokens)
  assert max(len(t) for t in tokens) == 64 and (lengths > 64).sum() == 6
  assert all(t[0] == 101 and t[-1] == 102 for t in tokens)  # [CLS] ... [SEP]
  assert tokenizer.padding == padding  # The caller's tokenizer is left as it was.
  assert vader.num_batches(len(movie['train']), 32) == 265


def _toy(n=103, seed=1):
  rng = np.random.default_rng(seed)
  tokens = [rng.integers(1, 1000, size=rng.integers(2, 40)).astype(np.int32) for _ in range(n)]
  return tokens, rng.integers(0, 2, size=n)


def _seen(batch_list):
  return [i for b in batch_list for i, w in zip(b['input_ids'][:, 0], b['weights']) if w]


def test_batches_shapes_and_padding():
  tokens, labels = _toy()
  tokens = [np.concatenate([[i], t]).astype(np.int32) for i, t in enumerate(tokens)]
  out = list(vader.batches(tokens, labels, 16, bucket=8, pad_id=-1))
  assert len(out) == vader.num_batches(103, 16) == 7
  for b in out:
    ids, mask = b['input_ids'], b['attention_mask']
    assert ids.shape[0] == 16 and ids.shape[1] % 8 == 0
    assert ids.dtype == mask.dtype == b['labels'].dtype == np.int32
    assert b['weights'].dtype == np.float32 and b['labels'].shape == (16,)
    lengths = np.array([len(tokens[i]) for i in ids[:, 0]])
    np.testing.assert_array_equal(mask.sum(1), lengths)
    assert ids.shape[1] - 8 < lengths.max() <= ids.shape[1]
    assert (ids[mask == 0] == -1).all()
    for row, i in zip(ids, ids[:, 0]):
      np.testing.assert_array_equal(row[:len(tokens[i])], tokens[i])
    np.testing.assert_array_equal(b['labels'], labels[ids[:, 0]])
  assert _seen(out) == list(range(103))  # In order without a seed.
  np.testing.assert_array_equal(out[-1]['weights'], [1.0] * 7 + [0.0] * 9)
  assert out[-1]['attention_mask'].sum(1).min() > 0  # Filler rows are never fully masked.


def test_batches_rows_are_slices_of_the_whole_batch():
  tokens, labels = _toy()
  whole = list(vader.batches(tokens, labels, 16, seed=3, bucket=8))
  halves = [list(vader.batches(tokens, labels, 16, seed=3, bucket=8, rows=slice(lo, lo + 8)))
            for lo in (0, 8)]
  for b, first, second in zip(whole, *halves):
    for key in b:  # same width as the whole batch, even where a half's rows are shorter
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), b[key])


def test_batches_shuffle_and_resume():
  tokens, labels = _toy()
  tokens = [np.concatenate([[i], t]).astype(np.int32) for i, t in enumerate(tokens)]
  epoch = lambda e, start=0: list(vader.batches(tokens, labels, 10, seed=3, epoch=e,
                                                start=start))
  e0, e1 = epoch(0), epoch(1)
  for e in (e0, e1):
    assert sorted(_seen(e)) == list(range(103)) and len(e) == 11
    assert sum(b['weights'].sum() for b in e) == 103
  assert _seen(e0) != _seen(e1) and _seen(e0) != list(range(103))
  assert _seen(e0) == list(np.random.default_rng([3, 0]).permutation(103))
  resumed = epoch(0, start=4)
  assert len(resumed) == 7
  for a, b in zip(e0[4:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert epoch(0, start=11) == []
  with pytest.raises(ValueError, match='start=12'):
    epoch(0, start=12)


def test_batches_on_movie(movie, tokenizer):
  tokens = vader.encode(tokenizer, movie['val'].texts)
  out = list(vader.batches(tokens, movie['val'].labels, 32, seed=0))
  assert len(out) == 33 and sum(b['weights'].sum() for b in out) == 1056
  assert {b['input_ids'].shape[1] for b in out} <= {16, 32, 48, 64}


def test_batches_grouped_by_length():
  tokens, labels = _toy(n=203)
  tokens = [np.concatenate([[i], t]).astype(np.int32) for i, t in enumerate(tokens)]
  epoch = lambda e, start=0, **kw: list(vader.batches(tokens, labels, 10, seed=3, epoch=e,
                                                      start=start, bucket=1, **kw))
  grouped, plain = epoch(0, group_by_length=4), epoch(0)
  assert sorted(_seen(grouped)) == list(range(203)) and len(grouped) == 21
  assert _seen(grouped) != _seen(epoch(1, group_by_length=4))  # reshuffled every epoch
  # Each batch holds rows of similar length: far less padding than random batches.
  pad = lambda bs: sum(b['input_ids'].size - b['attention_mask'].sum() for b in bs)
  assert pad(grouped) < 0.5 * pad(plain)
  # Groups of 4 batches come from consecutive slices of the epoch's permutation.
  perm = list(np.random.default_rng([3, 0]).permutation(203))
  groups = [set(perm[i:i + 40]) for i in range(0, 203, 40)]
  for b in grouped[:-1]:
    assert any(set(b['input_ids'][:, 0]) <= g for g in groups)
  assert grouped[-1]['weights'].sum() == 3  # the partial batch stays last
  for a, b in zip(grouped[5:], epoch(0, start=5, group_by_length=4)):  # resumes exactly
    np.testing.assert_array_equal(a['input_ids'], b['input_ids'])
  # Without a seed (evaluation) the rows come sorted by length.
  ordered = list(vader.batches(tokens, labels, 10, group_by_length=1))
  lengths = [len(tokens[i]) for i in _seen(ordered)]
  assert sorted(_seen(ordered)) == list(range(203)) and lengths == sorted(lengths)
