"""The tfds text corpora, token chunks and the LM batch iterator."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from peftjax.data import austen, corpus, tokenizer, vader


@pytest.fixture(scope='module')
def cache(tmp_path_factory, vader_dir):
  """A fresh cache root holding the VADER asset (linked) and nothing else."""
  root = tmp_path_factory.mktemp('cache')
  (root / 'vader').symlink_to(vader_dir, target_is_directory=True)
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('PEFTJAX_CACHE', str(root))
    corpus._prepared.cache_clear()
    yield root
  corpus._prepared.cache_clear()


@pytest.fixture(scope='module')
def small_tokenizer(cache):
  del cache
  return tokenizer.train_bpe(corpus.documents('austen', 'val')[:], 400, num_sentinels=4)


def _record_files(folder):
  return {p.name: p.read_bytes() for p in sorted(folder.glob('*.array_record*'))}


def test_austen_documents_are_the_chapters_of_each_split(cache):
  for split in corpus.SPLITS:
    docs = corpus.documents('austen', split)
    chapters = austen.chapters(split)
    assert len(docs) == len(chapters)
    assert docs[:] == [c.text for c in chapters]
  val = corpus.documents('austen', 'val')
  assert val[3] == austen.chapters('val')[3].text and val[-1] == val[len(val) - 1]
  assert val[2:5] == [val[2], val[3], val[4]]
  with pytest.raises(IndexError):
    val[len(val)]
  with pytest.raises(ValueError, match='unknown split'):
    corpus.documents('austen', 'validation')
  with pytest.raises(ValueError, match='unknown corpus'):
    corpus.documents('austin', 'train')


def test_vader_documents_follow_vaders_splits(cache, vader_dir):
  docs = {s: corpus.documents('vader', s) for s in corpus.SPLITS}
  expected = {s: [] for s in corpus.SPLITS}
  for domain in vader.DOMAINS:
    for split, rows in vader.load_split(domain, vader_dir).items():
      expected[split] += rows.texts
  for split in corpus.SPLITS:
    assert len(docs[split]) == len(expected[split])
    assert docs[split][::997] == expected[split][::997]
  assert [len(d) for d in docs.values()] == [18654, 2330, 2336]


def test_build_is_cached_and_deterministic(cache, tmp_path, monkeypatch):
  folder = cache / 'tfds' / 'text_corpus' / 'austen' / corpus.CORPORA['austen'].version
  corpus.prepare('austen')
  stamps = {p: p.stat().st_mtime_ns for p in folder.iterdir()}

  def fail(*args, **kwargs):
    raise AssertionError('rebuilt')

  monkeypatch.setattr(corpus.TextCorpus, '_generate_examples', fail)
  corpus._prepared.cache_clear()
  corpus.prepare('austen')  # Reuses the folder: no example is generated.
  assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
  monkeypatch.undo()
  monkeypatch.setenv('PEFTJAX_CACHE', str(tmp_path))
  other = corpus.prepare('austen')  # A second build elsewhere writes the same records.
  assert other.data_dir != str(folder)
  records = _record_files(folder)
  assert len(records) == 3 and _record_files(other.data_path) == records


def test_changed_data_needs_a_new_version(cache, monkeypatch):
  corpus.prepare('austen')
  source = corpus.CORPORA['austen']
  before = corpus.corpus_version('austen')

  def records():
    out = source.records()
    out['val'][0] = (out['val'][0][0], out['val'][0][1] + ' A changed ending.')
    return out

  changed = source.__class__(source.version, source.description, records)
  monkeypatch.setitem(corpus.CORPORA, 'austen', changed)
  corpus._prepared.cache_clear()
  assert corpus.corpus_version('austen') != before  # Keys of cached chunks change at once.
  with pytest.raises(RuntimeError, match='bump the version'):
    corpus.prepare('austen')
  monkeypatch.setitem(corpus.CORPORA, 'austen', changed.__class__(
      '1.0.1', source.description, records))

  class Bumped(corpus.TextCorpus, skip_registration=True):
    name = 'text_corpus'
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='austen', version='1.0.1')]

  monkeypatch.setattr(corpus, 'TextCorpus', Bumped)
  assert corpus.prepare('austen').data_dir.endswith('/austen/1.0.1')
  assert corpus.documents('austen', 'val')[0].endswith('ever." A changed ending.')
  corpus._prepared.cache_clear()


def test_token_chunks_cached_and_equal_to_a_fresh_stream(cache, small_tokenizer, monkeypatch):
  eos = tokenizer.EOS_ID
  chunks = corpus.token_chunks('austen', 'val', small_tokenizer, 96, eos_id=eos)
  docs = corpus.documents('austen', 'val')[:]
  fresh = corpus.chunk_stream(docs, small_tokenizer, 96, eos_id=eos)
  assert chunks.dtype == np.int32 and chunks.shape == fresh.shape and chunks.shape[1] == 96
  np.testing.assert_array_equal(chunks, fresh)
  # The stream is doc 0, EOS, doc 1, EOS, ... and only the last partial row is dropped.
  lengths = [len(small_tokenizer.encode(d, add_special_tokens=False).ids) + 1 for d in docs]
  assert len(chunks) == sum(lengths) // 96
  stream = chunks.ravel()
  ends = np.cumsum(lengths) - 1
  ends = ends[ends < len(stream)]
  np.testing.assert_array_equal(np.flatnonzero(stream == eos), ends)
  assert small_tokenizer.decode(stream[:ends[0]].tolist()) == docs[0]
  assert small_tokenizer.decode(stream[ends[0] + 1:ends[1]].tolist()) == docs[1]

  files = sorted((cache / 'chunks').iterdir())
  assert len(files) == 1 and files[0].name.startswith('austen-val-96-')

  def fail(*args, **kwargs):
    raise AssertionError('recomputed')

  monkeypatch.setattr(corpus, 'chunk_stream', fail)
  np.testing.assert_array_equal(corpus.token_chunks('austen', 'val', small_tokenizer, 96,
                                                    eos_id=eos), chunks)
  monkeypatch.undo()
  other = corpus.token_chunks('austen', 'val', small_tokenizer, 64, eos_id=eos)
  assert other.shape[1] == 64 and len(list((cache / 'chunks').iterdir())) == 2
  retrained = tokenizer.train_bpe(docs, 380, num_sentinels=4)
  np.testing.assert_array_equal(corpus.token_chunks('austen', 'val', retrained, 96, eos_id=eos),
                                corpus.chunk_stream(docs, retrained, 96, eos_id=eos))
  assert len(list((cache / 'chunks').iterdir())) == 3
  assert not [p for p in (cache / 'chunks').iterdir() if p.name.startswith('.')]


def _chunks(n=23, length=5):
  return np.arange(n * length, dtype=np.int32).reshape(n, length)


def _all(chunks, batch_size, **kw):
  return list(corpus.batches(chunks, batch_size, **kw))


def test_batches_in_order_are_full_and_cover_each_row_once():
  chunks = _chunks()
  got = _all(chunks, 4)
  assert len(got) == corpus.num_batches(23, 4) == 6
  for b in got:
    assert b['input_ids'].shape == (4, 5) and b['input_ids'].dtype == np.int32
  real = np.concatenate([b['input_ids'][b['weights'] > 0] for b in got])
  np.testing.assert_array_equal(real, chunks)
  last = got[-1]
  np.testing.assert_array_equal(last['weights'], [1, 1, 1, 0])
  np.testing.assert_array_equal(last['input_ids'][3], chunks[20])  # A copy of its own row.


def test_batches_shuffle_by_seed_and_epoch_deterministically():
  chunks = _chunks()

  def order(**kw):
    got = _all(chunks, 4, **kw)
    real = np.concatenate([b['input_ids'][b['weights'] > 0] for b in got])
    return real[:, 0] // 5

  a = order(seed=0, epoch=0)
  np.testing.assert_array_equal(a, order(seed=0, epoch=0))
  np.testing.assert_array_equal(np.sort(a), np.arange(23))
  np.testing.assert_array_equal(a, np.random.default_rng([0, 0]).permutation(23))
  assert not np.array_equal(a, order(seed=0, epoch=1))
  assert not np.array_equal(a, order(seed=1, epoch=0))
  assert not np.array_equal(a, np.arange(23))


def test_batches_resume_and_split_across_hosts():
  chunks = _chunks()
  full = _all(chunks, 4, seed=3, epoch=2)
  for start in range(len(full) + 1):
    resumed = _all(chunks, 4, seed=3, epoch=2, start=start)
    assert len(resumed) == len(full) - start
    for a, b in zip(resumed, full[start:]):
      np.testing.assert_array_equal(a['input_ids'], b['input_ids'])
      np.testing.assert_array_equal(a['weights'], b['weights'])
  hosts = [_all(chunks, 4, seed=3, epoch=2, rows=slice(h * 2, h * 2 + 2)) for h in range(2)]
  for b, h0, h1 in zip(full, *hosts):
    np.testing.assert_array_equal(np.concatenate([h0['input_ids'], h1['input_ids']]),
                                  b['input_ids'])
    np.testing.assert_array_equal(np.concatenate([h0['weights'], h1['weights']]), b['weights'])
  with pytest.raises(ValueError, match='start=7 outside'):
    _all(chunks, 4, start=7)
  with pytest.raises(ValueError, match=r'\[N, length\]'):
    _all(chunks.ravel(), 4)
