"""Tests of the offline asset cache, run on small fake archives (no network)."""
from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest

from peftjax.data import assets


def _write_archive(path: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
  """A zip (.whl/.zip) or gzipped tar holding `members`."""
  if path.suffix in ('.whl', '.zip'):
    with zipfile.ZipFile(path, 'w') as zf:
      for name, data in members.items():
        zf.writestr(name, data)
  else:
    with tarfile.open(path, 'w:gz') as tf:
      for name, data in members.items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
  return path


def _fake_archive(asset: assets.Asset, path: pathlib.Path, skip: str | None = None):
  """An archive laid out like `asset`'s real one; returns (path, contents by asset file)."""
  contents = {rel: f'{asset.name}:{rel}\n'.encode() * 3 for rel in asset.files}
  outer, nested = {'unrelated/file.txt': b'not extracted'}, {}
  for rel, chain in asset.files.items():
    if rel == skip:
      continue
    if len(chain) == 1:
      outer[chain[0]] = contents[rel]
    else:
      nested.setdefault(chain[0], {})[chain[1]] = contents[rel]
  for member, inner in nested.items():
    inner_path = _write_archive(path.parent / f'inner-{path.name}.tar.gz', inner)
    outer[member] = inner_path.read_bytes()
  return _write_archive(path, outer), contents


@pytest.fixture
def cache(tmp_path, monkeypatch):
  root = tmp_path / 'cache'
  monkeypatch.setenv('PEFTJAX_CACHE', str(root))
  return root


@pytest.fixture(params=['minilm', 'vader'])
def fake(request, tmp_path, monkeypatch):
  """(name, archive, contents) with the registry pinned to the fake archive's sha256."""
  name = request.param
  suffix = '.whl' if name == 'minilm' else '.tar.gz'
  archive, contents = _fake_archive(assets.ASSETS[name], tmp_path / f'fake{suffix}')
  asset = dataclasses.replace(assets.ASSETS[name], sha256=assets.sha256_file(archive))
  monkeypatch.setitem(assets.ASSETS, name, asset)
  return name, archive, contents


def _leftovers(root: pathlib.Path) -> list[str]:
  return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_registry_matches_brief():
  assert set(assets.ASSETS['minilm'].files) == {
      'config.json', 'model.safetensors', 'tokenizer.json', 'vocab.txt', '1_Pooling/config.json'}
  assert sorted(assets.ASSETS['vader'].files) == [
      'amazonReviewSnippets_GroundTruth.txt', 'movieReviewSnippets_GroundTruth.txt',
      'nytEditorialSnippets_GroundTruth.txt', 'tweets_GroundTruth.txt']
  assert set(assets.ASSETS['smollm2'].files) == {'SmolLM2-135M-Instruct.Q4_1.gguf'}


def test_cache_dir(monkeypatch, tmp_path):
  monkeypatch.setenv('PEFTJAX_CACHE', str(tmp_path))
  assert assets.cache_dir() == tmp_path
  monkeypatch.delenv('PEFTJAX_CACHE')
  assert assets.cache_dir() == pathlib.Path.home() / '.cache' / 'peftjax'


def test_fetch_from_archive(fake, cache):
  name, archive, contents = fake
  folder = assets.fetch([name], archive=archive)[name]
  assert folder == cache / name == assets.asset_path(name)
  for rel, data in contents.items():
    assert (folder / rel).read_bytes() == data
  manifest = json.loads((folder / assets.MANIFEST).read_text())
  assert set(manifest['files']) == set(contents)
  assert manifest['source_sha256'] == assets.ASSETS[name].sha256
  assert sorted(p.name for p in folder.iterdir() if p.is_file()) == sorted(
      [assets.MANIFEST] + [r for r in contents if '/' not in r])
  assert assets.verify(name) == folder
  assert _leftovers(cache) == [name]


def test_present_asset_is_not_fetched_again(fake, cache, monkeypatch):
  name, archive, _ = fake
  assets.fetch([name], archive=archive)
  monkeypatch.setattr(assets, '_install', lambda *a: pytest.fail('fetched again'))
  monkeypatch.setattr(assets, '_download', lambda *a: pytest.fail('downloaded again'))
  assert assets.fetch([name]) == {name: cache / name}


def test_fetch_downloads_with_pip(fake, cache, monkeypatch):
  name, archive, contents = fake
  calls = []

  def run(cmd, check):
    calls.append(cmd)
    dest = pathlib.Path(cmd[cmd.index('--dest') + 1])
    (dest / archive.name).write_bytes(archive.read_bytes())
    return subprocess.CompletedProcess(cmd, 0)

  monkeypatch.setattr(assets.subprocess, 'run', run)
  folder = assets.fetch([name])[name]
  (cmd,) = calls
  assert cmd[:5] == [sys.executable, '-m', 'pip', 'download', '--no-deps']
  assert cmd[-1] == assets.ASSETS[name].requirement
  assert ('--no-binary' in cmd) == (name == 'vader')
  assert (folder / next(iter(contents))).read_bytes() == next(iter(contents.values()))


def test_pip_failure_is_reported(cache, monkeypatch):
  monkeypatch.setattr(assets.subprocess, 'run',
                      lambda cmd, check: subprocess.CompletedProcess(cmd, 1))
  with pytest.raises(assets.AssetError, match='pip download of vaderSentiment==3.3.2 failed'):
    assets.fetch(['vader'])
  assert _leftovers(cache) == []


def test_fetch_infers_asset_from_archive(fake, cache):
  name, archive, _ = fake
  assert list(assets.fetch(archive=archive)) == [name]


def test_missing_asset_message(cache):
  with pytest.raises(FileNotFoundError) as info:
    assets.asset_path('vader')
  assert isinstance(info.value, assets.AssetMissingError)
  message = str(info.value)
  assert '\n' not in message
  assert "'vader'" in message and str(cache / 'vader') in message
  assert 'python -m peftjax.data.assets fetch vader' in message


def test_explicit_cache_in_message(tmp_path):
  with pytest.raises(assets.AssetMissingError, match=f'PEFTJAX_CACHE={tmp_path} python -m'):
    assets.asset_path('minilm', cache=tmp_path)


def test_unknown_asset(cache):
  for call in (assets.asset_path, assets.verify, lambda n: assets.fetch([n])):
    with pytest.raises(ValueError, match=f'known assets: {", ".join(sorted(assets.ASSETS))}'):
      call('bogus')


def test_checksum_mismatch(cache, tmp_path):
  archive, _ = _fake_archive(assets.ASSETS['minilm'], tmp_path / 'fake.whl')
  got = assets.sha256_file(archive)
  with pytest.raises(assets.ChecksumError) as info:
    assets.fetch(['minilm'], archive=archive)
  assert got in str(info.value) and assets.ASSETS['minilm'].sha256 in str(info.value)
  assert _leftovers(cache) == []


def test_failed_extraction_leaves_nothing(fake, cache, tmp_path, monkeypatch):
  name, _, contents = fake
  missing = sorted(contents)[-1]
  broken, _ = _fake_archive(assets.ASSETS[name], tmp_path / f'broken-{name}.tar.gz', missing)
  monkeypatch.setitem(assets.ASSETS, name, dataclasses.replace(
      assets.ASSETS[name], sha256=assets.sha256_file(broken)))
  with pytest.raises(assets.AssetError, match='has no member'):
    assets.fetch([name], archive=broken)
  assert _leftovers(cache) == []


def test_interrupted_copy_leaves_nothing(fake, cache, monkeypatch):
  name, archive, _ = fake
  real_copy, copied = assets.shutil.copyfileobj, []

  def copy_then_fail(src, dst, length=0):
    if copied:
      dst.write(b'half')
      raise OSError('disk full')
    copied.append(real_copy(src, dst, length))

  monkeypatch.setattr(assets.shutil, 'copyfileobj', copy_then_fail)
  with pytest.raises(OSError, match='disk full'):
    assets.fetch([name], archive=archive)
  assert _leftovers(cache) == []


def test_incomplete_asset_is_missing_and_refetched(fake, cache):
  name, archive, contents = fake
  folder = assets.fetch([name], archive=archive)[name]
  rel = sorted(contents)[0]
  (folder / rel).write_bytes(b'short')
  with pytest.raises(assets.AssetMissingError, match=f'{rel} has 5 bytes'):
    assets.asset_path(name)
  (folder / rel).unlink()
  with pytest.raises(assets.AssetMissingError, match=f'{rel} missing'):
    assets.asset_path(name)
  assets.fetch([name], archive=archive)
  assert (folder / rel).read_bytes() == contents[rel]
  (folder / assets.MANIFEST).write_text('[]')
  with pytest.raises(assets.AssetMissingError, match='MANIFEST.json malformed'):
    assets.asset_path(name)
  (folder / assets.MANIFEST).unlink()
  with pytest.raises(assets.AssetMissingError, match='MANIFEST.json missing'):
    assets.asset_path(name)
  assets.fetch([name], archive=archive)
  assert assets.verify(name) == folder
  assert _leftovers(cache) == [name]


def test_asset_from_another_archive_is_stale(fake, cache, monkeypatch):
  name, archive, _ = fake
  assets.fetch([name], archive=archive)
  monkeypatch.setitem(assets.ASSETS, name,
                      dataclasses.replace(assets.ASSETS[name], sha256='0' * 64))
  with pytest.raises(assets.AssetMissingError, match='another archive'):
    assets.asset_path(name)


def test_verify_detects_corruption(fake, cache):
  name, archive, contents = fake
  folder = assets.fetch([name], archive=archive)[name]
  rel = sorted(contents)[1]
  data = bytearray((folder / rel).read_bytes())
  data[0] ^= 1
  (folder / rel).write_bytes(bytes(data))
  assert assets.asset_path(name) == folder  # Same size: only the sha256 tells.
  with pytest.raises(assets.ChecksumError, match=f'sha256 mismatch in {rel}'):
    assets.verify(name)
  assets.fetch([name], archive=archive, force=True)
  assert assets.verify(name) == folder


def test_cli(fake, cache, capsys):
  name, archive, _ = fake
  assert assets.main(['path', name]) == 1
  assert 'python -m peftjax.data.assets fetch' in capsys.readouterr().err
  assert assets.main(['fetch', name, '--from', str(archive)]) == 0
  assert assets.main(['path', name]) == 0
  assert capsys.readouterr().out.splitlines()[-1] == str(cache / name)
  assert assets.main(['verify', name]) == 0
  assert assets.main(['verify']) == 1  # The other asset is not fetched.
  assert assets.main(['fetch', 'bogus']) == 1
  assert 'known assets' in capsys.readouterr().err
