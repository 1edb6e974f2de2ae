"""The VADER human-rated sentences (Hutto & Gilbert, ICWSM 2014) as classification data.

Each domain file holds tab-separated `id, mean rating (-4..4), text` lines. Rows rated 0 are
dropped, the label is `rating > 0`, rows are sorted by id (numerically: `'12'` or `'263_3'`
as integer tuples), shuffled with `np.random.RandomState(0).permutation` and cut 80/10/10
(rounded down; test takes the rest). The movie domain gives 8,454 / 1,056 / 1,058 rows.
Get the files with `python -m peftjax.data.assets fetch vader`.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
from typing import Iterator, Sequence

import numpy as np

from peftjax.data import assets

DOMAINS = {
    'movie': 'movieReviewSnippets_GroundTruth.txt',
    'tweets': 'tweets_GroundTruth.txt',
    'amazon': 'amazonReviewSnippets_GroundTruth.txt',
    'nyt': 'nytEditorialSnippets_GroundTruth.txt',
}
SPLITS = ('train', 'val', 'test')


@dataclasses.dataclass(frozen=True)
class Split:
  """Rows of a split: `ids` (str), `texts`, `ratings` (float32), `labels` (int32, 1 = positive)."""
  ids: np.ndarray
  texts: list[str]
  ratings: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.texts)

  def take(self, index: np.ndarray) -> Split:
    return Split(self.ids[index], [self.texts[i] for i in index], self.ratings[index],
                 self.labels[index])


def _id_key(row_id: str, where: str) -> tuple[int, ...]:
  try:
    return tuple(int(part) for part in row_id.split('_'))
  except ValueError:
    raise ValueError(f'{where}: id {row_id!r} is not integers joined by "_"') from None


def _path(domain: str, root: str | os.PathLike | None) -> pathlib.Path:
  if domain not in DOMAINS:
    raise ValueError(f'unknown VADER domain {domain!r}; known: {", ".join(DOMAINS)}')
  folder = assets.asset_path('vader') if root is None else pathlib.Path(root)
  return folder / DOMAINS[domain]


def load_domain(domain: str = 'movie', root: str | os.PathLike | None = None, *,
                drop_zero: bool = True) -> Split:
  """All rows of a domain, sorted by id; rows rated exactly 0 dropped unless `drop_zero=False`.

  `root` is the folder holding the `*_GroundTruth.txt` files (default: the `vader` asset).
  Texts are kept verbatim (UTF-8; HTML entities such as `&amp;` left as they are).
  """
  path = _path(domain, root)
  rows = []
  # Split on '\n' only: str.splitlines would also break lines at characters like '\x85'.
  for lineno, line in enumerate(path.read_bytes().decode('utf-8').split('\n'), 1):
    line = line.rstrip('\r')
    if not line:
      continue
    fields = line.split('\t', 2)
    if len(fields) != 3:
      raise ValueError(f'{path}:{lineno}: expected "id<TAB>rating<TAB>text", got {line!r}')
    row_id, rating, text = fields
    where = f'{path}:{lineno}'
    try:
      value = float(rating)
    except ValueError:
      raise ValueError(f'{where}: rating {rating!r} is not a number') from None
    rows.append((_id_key(row_id, where), row_id, value, text))
  if len({r[0] for r in rows}) != len(rows):
    raise ValueError(f'{path}: duplicate ids')
  rows.sort(key=lambda r: r[0])
  if drop_zero:
    rows = [r for r in rows if r[2] != 0.0]
  ratings = np.array([r[2] for r in rows], np.float64)
  return Split(ids=np.array([r[1] for r in rows], dtype=str), texts=[r[3] for r in rows],
               ratings=ratings.astype(np.float32), labels=(ratings > 0).astype(np.int32))


def split_sizes(n: int) -> tuple[int, int, int]:
  """(train, val, test) sizes: 80% and 10% rounded down, test the rest."""
  n_train, n_val = (8 * n) // 10, n // 10
  return n_train, n_val, n - n_train - n_val


def load_split(domain: str = 'movie', root: str | os.PathLike | None = None, *,
               seed: int = 0) -> dict[str, Split]:
  """The train/val/test splits of a domain, each in the order of the shared permutation."""
  rows = load_domain(domain, root)
  perm = np.random.RandomState(seed).permutation(len(rows))
  n_train, n_val, _ = split_sizes(len(rows))
  parts = np.split(perm, [n_train, n_train + n_val])
  return {name: rows.take(index) for name, index in zip(SPLITS, parts)}


def encode(tokenizer, texts: Sequence[str], max_length: int | None = 64) -> list[np.ndarray]:
  """Token ids (int32, with [CLS]/[SEP]) of each text, truncated to `max_length` if set.

  `tokenizer` is a `tokenizers.Tokenizer`; a copy is used with padding turned off, so the
  padding/truncation settings stored in a `tokenizer.json` neither apply nor change.
  """
  tok = copy.deepcopy(tokenizer)
  tok.no_padding()
  if max_length is None:
    tok.no_truncation()
  else:
    tok.enable_truncation(max_length)
  return [np.asarray(e.ids, np.int32) for e in tok.encode_batch(list(texts))]


def num_batches(n: int, batch_size: int) -> int:
  """Batches per epoch: ceil(n / batch_size)."""
  return -(-n // batch_size)


def batches(tokens: Sequence[np.ndarray], labels: np.ndarray, batch_size: int, *,
            seed: int | None = None, epoch: int = 0, start: int = 0, bucket: int = 16,
            pad_id: int = 0, rows: slice = slice(None),
            group_by_length: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of padded batches, each exactly `batch_size` rows.

  Yields dicts of `input_ids` and `attention_mask` (int32 [B, L]), `labels` (int32 [B]) and
  `weights` (float32 [B]). Rows come in order if `seed` is None, else in the order
  `np.random.default_rng([seed, epoch]).permutation(n)`. L is the longest sequence of the
  batch rounded up to a multiple of `bucket`. The last batch is filled up with copies of its
  own rows (real tokens, so no row is fully masked) with weight 0. `start` skips the first
  `start` batches, so a resumed epoch yields exactly the batches that remained. `rows`
  builds only those rows of each batch (a host's share in a multi-process run); L is still
  the whole batch's.

  `group_by_length=k > 0` cuts padding as HF's length-grouped sampler does: the permutation
  is cut into groups of k batches, each sorted by length, and the full batches are then
  shuffled (the last, partial one stays last); with `seed` None the rows come sorted by
  length (evaluation order does not matter).
  """
  n = len(tokens)
  labels = np.asarray(labels)
  if len(labels) != n:
    raise ValueError(f'{n} token arrays but {len(labels)} labels')
  if batch_size < 1 or bucket < 1:
    raise ValueError(f'batch_size and bucket must be positive, got {batch_size}, {bucket}')
  total = num_batches(n, batch_size)
  if not 0 <= start <= total:
    raise ValueError(f'start={start} outside [0, {total}]')
  order = np.arange(n) if seed is None else np.random.default_rng([seed, epoch]).permutation(n)
  if group_by_length:
    order = _group_by_length(order, tokens, batch_size, group_by_length,
                             None if seed is None else np.random.default_rng([seed, epoch, 1]))
  for b in range(start, total):
    real = order[b * batch_size:(b + 1) * batch_size]
    chosen = np.resize(real, batch_size)  # Repeats `real` cyclically to fill the batch.
    lengths = np.array([len(tokens[i]) for i in chosen])
    width = max(bucket, -(-int(lengths.max()) // bucket) * bucket)
    weights = np.zeros(batch_size, np.float32)
    weights[:len(real)] = 1.0
    chosen, lengths, weights = chosen[rows], lengths[rows], weights[rows]
    input_ids = np.full((len(chosen), width), pad_id, np.int32)
    for r, i in enumerate(chosen):
      input_ids[r, :lengths[r]] = tokens[i]
    yield {
        'input_ids': input_ids,
        'attention_mask': (np.arange(width) < lengths[:, None]).astype(np.int32),
        'labels': labels[chosen].astype(np.int32),
        'weights': weights,
    }


def _group_by_length(order, tokens, batch_size: int, group: int, rng) -> np.ndarray:
  length = np.array([len(t) for t in tokens])
  if rng is None:
    return order[np.argsort(length[order], kind='stable')]
  size = group * batch_size
  order = np.concatenate([chunk[np.argsort(-length[chunk], kind='stable')]
                          for chunk in np.split(order, range(size, len(order), size))])
  full = len(order) // batch_size
  shuffled = order[:full * batch_size].reshape(full, batch_size)[rng.permutation(full)]
  return np.concatenate([shuffled.ravel(), order[full * batch_size:]])
