"""Text corpora for language modelling: a tfds builder, token chunks and batches.

Two corpora, each with 'train', 'val' and 'test' splits of documents (str):
- 'austen': the six novels, one document per chapter (`peftjax.data.austen`; held-out
  splits are whole chapters of every book). Chapters, not paragraphs: the token stream is cut
  into fixed-length rows, so a row should read on across paragraph breaks as the book does
  (paragraphs are joined by '\\n\\n'), and EOS should mark a real document end rather than
  fall every ~100 tokens (the median paragraph is short dialogue).
- 'vader': the VADER sentences of all four domains (movie, tweets, amazon, nyt), one
  document per sentence, split as `peftjax.data.vader.load_split` splits each domain; zero-
  rated sentences are dropped there. Needs `python -m peftjax.data.assets fetch vader`.

The documents are built once by `TextCorpus` (a local tfds `GeneratorBasedBuilder`, array
record files, no TensorFlow) into `<cache>/tfds/text_corpus/<corpus>/<version>/` and read
back with `as_data_source()`; later calls reuse that folder. A config's version is bumped
whenever its documents change: the builder records the documents' sha256 and refuses a
folder that holds other documents under the same version.

`token_chunks` tokenises a split into one stream (each document followed by EOS) cut into
rows of `length` tokens, cached under `<cache>/chunks/`. `batches` iterates over such rows
with the semantics of `peftjax.data.vader.batches`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import io
import json
import pathlib
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from peftjax.data import assets, austen, vader
from peftjax.io import files

SPLITS = ('train', 'val', 'test')
_CHUNKS_FORMAT = 1  # Bump when token_chunks computes rows differently.


@dataclasses.dataclass(frozen=True)
class _Source:
  version: str
  description: str
  records: Callable[[], dict[str, list[tuple[str, str]]]]  # split -> [(source id, text)].


def _austen_records() -> dict[str, list[tuple[str, str]]]:
  return {split: [(f'{c.book}/{c.number}', c.text) for c in austen.chapters(split)]
          for split in SPLITS}


def _vader_records() -> dict[str, list[tuple[str, str]]]:
  out = {split: [] for split in SPLITS}
  for domain in vader.DOMAINS:
    for split, rows in vader.load_split(domain).items():
      out[split] += [(f'{domain}/{row_id}', text) for row_id, text in zip(rows.ids, rows.texts)]
  return out


CORPORA = {
    'austen': _Source('1.0.0', 'Jane Austen\'s six novels, one document per chapter',
                      _austen_records),
    'vader': _Source('1.0.0', 'VADER sentences of the four domains, one per document',
                     _vader_records),
}


def _source(corpus: str) -> _Source:
  if corpus not in CORPORA:
    raise ValueError(f'unknown corpus {corpus!r}; known: {", ".join(CORPORA)}')
  return CORPORA[corpus]


@functools.lru_cache(maxsize=8)
def _documents(source: _Source) -> tuple[dict[str, list[tuple[str, str]]], str]:
  """A source's records and their sha256 (the fingerprint), computed once per process."""
  records = source.records()
  if set(records) != set(SPLITS):
    raise ValueError(f'{source.description}: splits {sorted(records)}, expected {SPLITS}')
  data = json.dumps([records[s] for s in SPLITS], ensure_ascii=False).encode('utf-8')
  return records, hashlib.sha256(data).hexdigest()


def fingerprint(corpus: str) -> str:
  """sha256 of every split's documents and source ids."""
  return _documents(_source(corpus))[1]


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')


class TextCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents of a corpus: features `text` and `source` (e.g. 'Emma/19', 'movie/263_3')."""
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, version=s.version,
                                             description=s.description)
                     for name, s in CORPORA.items()]
  # No checksums file to look up beside the code. (tfds 4.9.10's default looks the module up
  # through `importlib_resources`, which it requires only on Python < 3.9.)
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(),
                                             'source': tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(fingerprint=fingerprint(self.builder_config.name)),
        disable_shuffling=True)  # Documents keep their corpus order.

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    records = _documents(_source(self.builder_config.name))[0]
    return {split: self._generate_examples(records[split]) for split in SPLITS}

  def _generate_examples(self, records: list[tuple[str, str]]):
    for i, (source, text) in enumerate(records):
      yield i, {'text': text, 'source': source}


def data_dir() -> pathlib.Path:
  """Where the tfds folders live: `<cache>/tfds`."""
  return assets.cache_dir() / 'tfds'


@functools.lru_cache(maxsize=16)
def _prepared(corpus: str, root: str) -> TextCorpus:
  source = _source(corpus)
  builder = TextCorpus(config=corpus, data_dir=root, file_format='array_record')
  shown = tqdm_utils._active  # pylint: disable=protected-access
  tfds.display_progress_bar(False)  # a build takes seconds: no bars in the run's log
  try:
    builder.download_and_prepare()  # Returns at once if the version's folder is complete.
  finally:
    tfds.display_progress_bar(shown)
  built = tfds.builder_from_directory(builder.data_dir)
  expected, got = fingerprint(corpus), built.info.metadata.get('fingerprint')
  if got != expected:
    raise RuntimeError(f'{builder.data_dir} holds documents with fingerprint {got}, but they '
                       f'now have {expected}: bump the version of corpus {corpus!r} '
                       f'({source.version}) in {__name__}.CORPORA')
  return builder


def prepare(corpus: str) -> TextCorpus:
  """The corpus's builder, its files built if not yet in the cache."""
  return _prepared(corpus, str(data_dir()))


def corpus_version(corpus: str) -> str:
  """`<corpus>-<version>-<fingerprint prefix>`: changes whenever the documents do."""
  return f'{corpus}-{_source(corpus).version}-{fingerprint(corpus)[:12]}'


class Documents(Sequence[str]):
  """The texts of one split, read from the array record files on demand."""

  def __init__(self, data_source, name: str):
    self._source, self.name = data_source, name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      rows = self._source.__getitems__(range(*index.indices(len(self))))
      return [row['text'].decode('utf-8') for row in rows]
    n = len(self)
    i = index.__index__()
    if not -n <= i < n:
      raise IndexError(f'document {i} of {self.name}, which has {n}')
    return self._source[i % n]['text'].decode('utf-8')

  def __repr__(self) -> str:
    return f'Documents({self.name}, {len(self)} documents)'


def documents(corpus: str, split: str) -> Documents:
  """The documents of a split, in corpus order; random access (`docs[i]`, `docs[a:b]`)."""
  _check_split(split)
  builder = prepare(corpus)
  return Documents(builder.as_data_source(split=split), f'{corpus}/{split}')


def tokenizer_hash(tokenizer) -> str:
  """sha256 of a `tokenizers.Tokenizer`'s JSON."""
  return hashlib.sha256(tokenizer.to_str().encode('utf-8')).hexdigest()


def chunk_stream(texts: Sequence[str], tokenizer, length: int, *, eos_id: int) -> np.ndarray:
  """Rows [N, length] (int32) of the stream `tokens(t0) EOS tokens(t1) EOS ...`.

  Tokens come without the tokenizer's own special tokens (`add_special_tokens=False`) and
  without its padding or truncation. The last partial row (< `length` tokens) is dropped.
  """
  if length < 1:
    raise ValueError(f'length must be positive, got {length}')
  tok = copy.deepcopy(tokenizer)
  tok.no_padding()
  tok.no_truncation()
  pieces = []
  for enc in tok.encode_batch(list(texts), add_special_tokens=False):
    pieces += [np.asarray(enc.ids, np.int32), np.array([eos_id], np.int32)]
  stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
  n = len(stream) // length
  return stream[:n * length].reshape(n, length)


def token_chunks(corpus: str, split: str, tokenizer, length: int, *,
                 eos_id: int) -> np.ndarray:
  """`chunk_stream` of a split's documents, cached on disk.

  The cache file `<cache>/chunks/<corpus>-<split>-<length>-<key>.npy` is keyed by the
  corpus version, the tokenizer's hash, `length` and `eos_id`, and written atomically.
  """
  _check_split(split)
  key = hashlib.sha256(json.dumps([corpus_version(corpus), split, tokenizer_hash(tokenizer),
                                   length, eos_id, _CHUNKS_FORMAT]).encode()).hexdigest()
  path = assets.cache_dir() / 'chunks' / f'{corpus}-{split}-{length}-{key[:16]}.npy'
  if path.exists():
    chunks = np.load(path)
    if chunks.dtype == np.int32 and chunks.ndim == 2 and chunks.shape[1] == length:
      return chunks
  chunks = chunk_stream(documents(corpus, split)[:], tokenizer, length, eos_id=eos_id)
  buf = io.BytesIO()
  np.save(buf, chunks)
  files.atomic_write_bytes(path, buf.getvalue())
  return chunks


def num_batches(n: int, batch_size: int) -> int:
  """Batches per epoch: ceil(n / batch_size)."""
  return vader.num_batches(n, batch_size)


def batches(chunks: np.ndarray, batch_size: int, *, seed: int | None = None, epoch: int = 0,
            start: int = 0, rows=slice(None)) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of `{'input_ids': int32 [B, length], 'weights': float32 [B]}`, B = `batch_size`.

  Rows come in order if `seed` is None, else in the order
  `np.random.default_rng([seed, epoch]).permutation(n)`. The last batch is filled up with
  copies of its own rows with weight 0, so one epoch sees every row exactly once (evaluation
  covers the whole split). `start` skips the first `start` batches, so a resumed epoch yields
  exactly the batches that remained. `rows` keeps only those rows of each batch (a host's
  share in a multi-process run).
  """
  chunks = np.asarray(chunks)
  if chunks.ndim != 2:
    raise ValueError(f'chunks must be [N, length], got shape {chunks.shape}')
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  n = len(chunks)
  total = num_batches(n, batch_size)
  if not 0 <= start <= total:
    raise ValueError(f'start={start} outside [0, {total}]')
  order = np.arange(n) if seed is None else np.random.default_rng([seed, epoch]).permutation(n)
  for b in range(start, total):
    real = order[b * batch_size:(b + 1) * batch_size]
    chosen = np.resize(real, batch_size)  # Repeats `real` cyclically to fill the batch.
    weights = np.zeros(batch_size, np.float32)
    weights[:len(real)] = 1.0
    yield {'input_ids': chunks[chosen[rows]].astype(np.int32), 'weights': weights[rows]}
