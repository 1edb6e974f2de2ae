"""Jane Austen's six novels as chapters of paragraphs, with held-out chapters in every book.

The text comes from Debian's `r-cran-janeaustenr` 1.0.0-1 (MIT; the novels are public
domain), which stores each novel as an R character vector of lines in its lazy-load data
base. `python -m peftjax.data.austen extract [--deb FILE]` downloads the pinned package
with `apt-get download` (or takes FILE), checks its sha256, unpacks it with `dpkg-deb -x`,
reads the lines with `peftjax.data.rdata` and writes `corpora/austen.jsonl.gz` beside this
module: one JSON object per chapter, `{"book", "chapter", "heading", "paragraphs"}`, in
book order, gzipped with mtime 0 so the bytes are reproducible. That file is committed.

Structure, from the lines:
- Blank lines separate paragraphs. Wrapped lines join with a space; an indented line
  (verse, letters, signatures) keeps its own line, without its indentation.
- A paragraph `CHAPTER n` / `Chapter n` (roman or arabic) starts a chapter; `VOLUME n`
  (Emma) goes into the next chapter's heading. Chapters are numbered 1, 2, ... through a
  book, across volumes (Emma's VOLUME II, CHAPTER I is chapter 19). What precedes chapter 1
  (title page; Northanger Abbey's "Advertisement by the Authoress") is chapter 0.
- A book ends at `THE END`, `FINIS` or `Finis`, or at Northanger Abbey's `A NOTE ON THE
  TEXT` (the Signet edition's note); that marker and what follows are dropped, and so are
  the two printer's notes `[End volume one of this edition. ...]` and `(End of volume one.)`.

Splits: chapter n is 'val' if n % 20 == 10, 'test' if n % 20 == 15, else 'train' (chapter 0
is train). Every novel has at least 24 chapters, so every book has chapters in every split;
held-out text is whole unseen chapters: 14 val and 12 test chapters of 269 (5.3% and
4.5% of the characters).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Sequence

from peftjax.data import assets, rdata
from peftjax.io import files

PACKAGE, PACKAGE_VERSION = 'r-cran-janeaustenr', '1.0.0-1'
DEB_SHA256 = 'df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95'
_RDATA = 'usr/lib/R/site-library/janeaustenr/data/Rdata'
# R object name -> title, in the package's (publication) order.
BOOKS = {
    'sensesensibility': 'Sense & Sensibility',
    'prideprejudice': 'Pride & Prejudice',
    'mansfieldpark': 'Mansfield Park',
    'emma': 'Emma',
    'northangerabbey': 'Northanger Abbey',
    'persuasion': 'Persuasion',
}
SPLITS = ('train', 'val', 'test')
DATA_PATH = pathlib.Path(__file__).parent / 'corpora' / 'austen.jsonl.gz'
# sha256 of the committed gzip file, and of its uncompressed JSON lines (checked on load, so
# a file re-extracted with another zlib, same text, still loads).
FILE_SHA256 = 'e6f2ab458adac99d347dd6c474b75c355d1ac230fbd195c3f94c3d9fe1868a9b'
TEXT_SHA256 = 'eba3df39e3059683f302a308340db5d04bf77e337ecf730401c8bbdc55606660'
EXTRACT_COMMAND = 'python -m peftjax.data.austen extract'

_HEADING = re.compile(r'(CHAPTER|Chapter) ([0-9]+|[IVXLC]+)')
_VOLUME = re.compile(r'VOLUME [IVX]+')
_END = ('THE END', 'FINIS', 'Finis', 'A NOTE ON THE TEXT')
_PRINTER_NOTES = ('[End volume one of this edition.', '(End of volume one.)')


@dataclasses.dataclass(frozen=True)
class Chapter:
  """One chapter: `book` title, `number` (0 = front matter), `heading`, `paragraphs`."""
  book: str
  number: int
  heading: str
  paragraphs: tuple[str, ...]

  @property
  def split(self) -> str:
    return split_of(self.number)

  @property
  def text(self) -> str:
    """Paragraphs joined by blank lines ('\\n\\n'); kept line breaks inside are single."""
    return '\n\n'.join(self.paragraphs)


def split_of(number: int) -> str:
  """'val' for chapters 10, 30, 50, ..., 'test' for 15, 35, 55, ..., else 'train'."""
  if number < 0:
    raise ValueError(f'chapter numbers are >= 0, got {number}')
  return {10: 'val', 15: 'test'}.get(number % 20, 'train')


def _paragraphs(lines: Sequence[str]) -> list[str]:
  out, current = [], []
  for line in list(lines) + ['']:
    if line.strip():
      current.append(line.rstrip())
      continue
    if current:
      text = current[0].strip()
      for cont in current[1:]:
        text += ('\n' if cont[0].isspace() else ' ') + cont.strip()
      out.append(text)
      current = []
  return out


def structure(book: str, lines: Sequence[str]) -> list[Chapter]:
  """The chapters of one novel from its lines (see the module docstring for the rules)."""
  chapters, heading, body, volume = [], '', [], []
  for para in _paragraphs(lines):
    if para in _END:
      break
    if para.startswith(_PRINTER_NOTES):
      continue
    if _VOLUME.fullmatch(para):
      volume.append(para)
    elif _HEADING.fullmatch(para):
      chapters.append(Chapter(book, len(chapters), heading, tuple(body)))
      heading, body, volume = '\n'.join(volume + [para]), [], []
    else:
      if volume:
        raise ValueError(f'{book}: {volume} not followed by a chapter heading but by {para!r}')
      body.append(para)
  chapters.append(Chapter(book, len(chapters), heading, tuple(body)))
  empty = [c.number for c in chapters[1:] if not c.paragraphs]
  if len(chapters) < 21 or empty:
    raise ValueError(f'{book}: expected >= 20 non-empty chapters, got {len(chapters) - 1} '
                     f'(empty: {empty})')
  return chapters


def _encode(chapters: Sequence[Chapter]) -> bytes:
  lines = [json.dumps({'book': c.book, 'chapter': c.number, 'heading': c.heading,
                       'paragraphs': list(c.paragraphs)}, ensure_ascii=False) + '\n'
           for c in chapters]
  return ''.join(lines).encode('utf-8')


def _gzip(data: bytes) -> bytes:
  buf = io.BytesIO()
  with gzip.GzipFile(filename='', mode='wb', fileobj=buf, compresslevel=9, mtime=0) as f:
    f.write(data)
  return buf.getvalue()


def read_lines(deb: str | os.PathLike) -> dict[str, list[str]]:
  """The six novels' lines (by R object name) from the package file `deb`."""
  got = assets.sha256_file(deb)
  if got != DEB_SHA256:
    raise assets.ChecksumError(f'{deb} has sha256 {got}, expected {DEB_SHA256} '
                               f'({PACKAGE} {PACKAGE_VERSION})')
  with tempfile.TemporaryDirectory(prefix='peftjax-austen-') as tmp:
    result = subprocess.run(['dpkg-deb', '-x', str(deb), tmp], capture_output=True, text=True)
    if result.returncode:
      raise assets.AssetError(f'dpkg-deb -x {deb} failed (exit {result.returncode}): '
                              f'{result.stderr.strip()[-500:]}')
    objects = rdata.read_lazyload(pathlib.Path(tmp) / _RDATA)
  if set(objects) != set(BOOKS):
    raise ValueError(f'{deb}: expected objects {sorted(BOOKS)}, got {sorted(objects)}')
  return {name: objects[name] for name in BOOKS}


def download(dest: str | os.PathLike) -> pathlib.Path:
  """`apt-get download`s the pinned package into the folder `dest`; returns the file."""
  return assets.apt_download(f'{PACKAGE}={PACKAGE_VERSION}', dest,
                             local_file=f'{EXTRACT_COMMAND} --deb FILE')


def extract(deb: str | os.PathLike | None = None, out: str | os.PathLike = DATA_PATH, *,
            check: bool = True) -> pathlib.Path:
  """Writes the chapters file from the package (downloaded if `deb` is None).

  With `check`, the text must hash to TEXT_SHA256, else nothing is written.
  """
  with tempfile.TemporaryDirectory(prefix='peftjax-austen-deb-') as tmp:
    lines = read_lines(download(tmp) if deb is None else deb)
  data = _encode([c for name, book in lines.items() for c in structure(BOOKS[name], book)])
  got = hashlib.sha256(data).hexdigest()
  if check and got != TEXT_SHA256:
    raise assets.ChecksumError(f'extracted text has sha256 {got}, expected {TEXT_SHA256}; '
                               'if the change is intended, update TEXT_SHA256 and FILE_SHA256')
  files.atomic_write_bytes(out, _gzip(data))
  return pathlib.Path(out)


@functools.lru_cache(maxsize=4)
def load(path: str | os.PathLike = DATA_PATH) -> tuple[Chapter, ...]:
  """Every chapter of the six novels, in book order; the text's sha256 is checked."""
  try:
    data = gzip.decompress(pathlib.Path(path).read_bytes())
  except FileNotFoundError:
    raise FileNotFoundError(f'{path} is missing; recreate it with {EXTRACT_COMMAND}') from None
  got = hashlib.sha256(data).hexdigest()
  if got != TEXT_SHA256:
    raise assets.ChecksumError(f'{path}: text sha256 {got}, expected {TEXT_SHA256}; '
                               f'recreate it with {EXTRACT_COMMAND}')
  rows = [json.loads(line) for line in data.decode('utf-8').splitlines()]
  return tuple(Chapter(r['book'], r['chapter'], r['heading'], tuple(r['paragraphs']))
               for r in rows)


def chapters(split: str | None = None) -> list[Chapter]:
  """The chapters of `split` ('train', 'val', 'test'; all if None), in book order."""
  if split is not None and split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
  return [c for c in load() if split is None or c.split == split]


def stats() -> dict[str, dict[str, int]]:
  """Chapters, paragraphs and characters (of chapter texts) per split."""
  out = {}
  for split in SPLITS:
    rows = chapters(split)
    out[split] = {'books': len({c.book for c in rows}), 'chapters': len(rows),
                  'paragraphs': sum(len(c.paragraphs) for c in rows),
                  'characters': sum(len(c.text) for c in rows)}
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m peftjax.data.austen', description=__doc__
                                   .split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('extract', help=f'rebuild {DATA_PATH.name} from {PACKAGE}')
  p.add_argument('--deb', help=f'a local {PACKAGE}_{PACKAGE_VERSION}_all.deb (default: '
                 'apt-get download)')
  p.add_argument('--out', default=str(DATA_PATH), help='where to write (default: %(default)s)')
  sub.add_parser('stats', help='chapters, paragraphs and characters per split')
  args = parser.parse_args(argv)
  try:
    if args.command == 'extract':
      path = extract(args.deb, args.out)
      print(f'{path}\t{path.stat().st_size} bytes\tsha256 {assets.sha256_file(path)}')
    else:
      for split, row in stats().items():
        print(split, ' '.join(f'{k}={v}' for k, v in row.items()))
  except (assets.AssetError, OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
