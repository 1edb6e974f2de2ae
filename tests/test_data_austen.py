"""The committed Austen corpus, its structure rules and splits, and the R data reader."""
from __future__ import annotations

import collections
import gzip
import shutil
import struct
import zlib

import pytest

from peftjax.data import assets, austen, rdata

CHAPTERS = {'Sense & Sensibility': 50, 'Pride & Prejudice': 61, 'Mansfield Park': 48,
            'Emma': 55, 'Northanger Abbey': 31, 'Persuasion': 24}


# A writer for the few XDR items the reader supports, so the reader is tested on bytes
# built independently of it (big-endian ints, CHARSXP flags with the encoding level bits).

def _int(*values: int) -> bytes:
  return struct.pack(f'>{len(values)}i', *values)


def _char(s: str | None, level: int | None = None) -> bytes:
  if s is None:
    return _int(9, -1)
  if level is None:  # R's ASCII or UTF8 level bit.
    level = 1 << 6 if s.isascii() else 1 << 3
  raw = s.encode('latin-1' if level & 4 else 'utf-8')
  return _int(9 | (level << 12), len(raw)) + raw


def _strsxp(values, attr: bytes = b'') -> bytes:
  return _int(16 | (1 << 9 if attr else 0), len(values)) + b''.join(map(_char, values)) + attr


def _names_attr(names) -> bytes:  # pairlist(names = <names>), the symbol written in full.
  return _int(2 | 1 << 10, 1) + _char('names') + _strsxp(names) + _int(254)


def _serialize(item: bytes, version: int = 3) -> bytes:
  head = b'X\n' + _int(version, 0x040201, 0x030500)
  return head + (_int(5) + b'UTF-8' if version == 3 else b'') + item


def test_reader_on_hand_made_serialisations():
  assert rdata.unserialize(_serialize(_strsxp(['a', None, 'Ünïcode £']))) == [
      'a', None, 'Ünïcode £']
  assert rdata.unserialize(_serialize(_strsxp(['v2']), version=2)) == ['v2']
  latin = _int(16, 1) + _char('caf\xe9', level=4)
  assert rdata.unserialize(_serialize(latin)) == ['caf\xe9']
  ints = _int(13, 3, 7, -2**31, -5)
  assert rdata.unserialize(_serialize(ints)) == [7, None, -5]
  reals = _int(14, 2) + struct.pack('>2d', 0.5, -3.0)
  assert rdata.unserialize(_serialize(reals)) == [0.5, -3.0]
  # A named list; its names attribute refers back to the symbol 'names' (REFSXP 1) that the
  # attribute of its second element wrote in full.
  inner = _int(13 | 1 << 9, 1, 4) + _names_attr(['x'])
  ref_names = _int(2 | 1 << 10, 255 | 1 << 8) + _strsxp(['first', 'second']) + _int(254)
  named = _int(19 | 1 << 9, 2) + _strsxp(['p', 'q']) + inner + ref_names
  assert rdata.unserialize(_serialize(named)) == {'first': ['p', 'q'], 'second': [4]}
  with pytest.raises(rdata.RDataError, match='XDR'):
    rdata.unserialize(b'A\n' + _serialize(_strsxp([]))[2:])
  with pytest.raises(rdata.RDataError, match='unsupported R type 3'):
    rdata.unserialize(_serialize(_int(3)))
  with pytest.raises(rdata.RDataError, match='left after'):
    rdata.unserialize(_serialize(_strsxp(['a'])) + b'\0')


def test_read_lazyload_follows_the_index(tmp_path):
  objects = {'first': ['one', 'line two'], 'second': ['x'] * 3}
  chunks, offsets = b'', {}
  for name, lines in objects.items():
    data = _serialize(_strsxp(lines))
    chunk = struct.pack('>I', len(data)) + zlib.compress(data)
    offsets[name] = (len(chunks), len(chunk))
    chunks += chunk
  variables = _int(19 | 1 << 9, 2) + b''.join(_int(13, 2, *offsets[n]) for n in objects)
  variables += _names_attr(list(objects))
  index = (_int(19 | 1 << 9, 3) + variables + _int(19, 0) + _int(10, 1, 1)
           + _names_attr(['variables', 'references', 'compressed']))
  (tmp_path / 'Rdata.rdx').write_bytes(gzip.compress(_serialize(index)))
  (tmp_path / 'Rdata.rdb').write_bytes(chunks)
  assert rdata.read_lazyload(tmp_path / 'Rdata') == objects


def test_committed_file_is_pinned():
  assert assets.sha256_file(austen.DATA_PATH) == austen.FILE_SHA256
  assert 1_300_000 < austen.DATA_PATH.stat().st_size < 1_600_000


def test_six_books_with_their_chapters():
  chapters = austen.load()
  books = collections.Counter(c.book for c in chapters if c.number > 0)
  assert list(books) == list(austen.BOOKS.values()) == list(CHAPTERS)
  assert dict(books) == CHAPTERS
  for book in CHAPTERS:
    numbers = [c.number for c in chapters if c.book == book]
    assert numbers == list(range(CHAPTERS[book] + 1))
  characters = sum(len(c.text) for c in chapters)
  assert characters == 4_017_824  # 4,025,028 in the package's lines, newlines included.
  assert sum(len(c.paragraphs) for c in chapters) == 10_018
  emma = [c for c in chapters if c.book == 'Emma']
  assert emma[1].heading == 'VOLUME I\nCHAPTER I' and emma[19].heading == 'VOLUME II\nCHAPTER I'
  assert emma[1].paragraphs[0].startswith('Emma Woodhouse, handsome, clever, and rich, with a')
  pride = [c for c in chapters if c.book == 'Pride & Prejudice']
  assert pride[1].paragraphs[0] == ('It is a truth universally acknowledged, that a single man '
                                    'in possession of a good fortune, must be in want of a wife.')
  assert pride[-1].paragraphs[-1].endswith('had been the means of uniting them.')
  paragraphs = {p for c in chapters for p in c.paragraphs}
  for dropped in ('THE END', 'FINIS', 'Finis', 'A NOTE ON THE TEXT'):
    assert dropped not in paragraphs
  text = '\n'.join(paragraphs)
  for dropped in ('Signet', 'End volume', 'End of volume'):
    assert dropped not in text


def test_load_checks_the_text(tmp_path):
  path = tmp_path / 'austen.jsonl.gz'
  data = gzip.decompress(austen.DATA_PATH.read_bytes())
  path.write_bytes(gzip.compress(data.replace(b'Emma Woodhouse', b'Emma Woodhousf', 1)))
  with pytest.raises(assets.ChecksumError, match='expected ' + austen.TEXT_SHA256):
    austen.load(path)
  path.write_bytes(gzip.compress(data, compresslevel=1))  # Other bytes, same text: loads.
  assert austen.load(path) == austen.load()


def test_splits_are_disjoint_covering_and_hold_every_book():
  chapters = austen.load()
  parts = {s: austen.chapters(s) for s in austen.SPLITS}
  keys = {s: {(c.book, c.number) for c in rows} for s, rows in parts.items()}
  assert not keys['train'] & keys['val'] and not keys['train'] & keys['test']
  assert not keys['val'] & keys['test']
  assert set().union(*keys.values()) == {(c.book, c.number) for c in chapters}
  assert sum(map(len, parts.values())) == len(chapters)
  for split, rows in parts.items():
    assert {c.book for c in rows} == set(CHAPTERS), split
  val = {(c.book, c.number) for c in parts['val']}
  assert ('Persuasion', 10) in val and ('Emma', 50) in val and ('Emma', 55) not in val
  assert {c.number for c in parts['test']} == {15, 35, 55}
  assert len(parts['val']) == 14 and len(parts['test']) == 12
  assert all(c.split == 'train' for c in chapters if c.number == 0)
  with pytest.raises(ValueError, match='unknown split'):
    austen.chapters('validation')


def test_structure_rules():
  lines = ['TITLE', '', 'Front matter line one', 'continued.', '', '', 'VOLUME I', '',
           'CHAPTER I', '', 'First paragraph wraps', 'onto a second line.', '',
           'He read:', '   "A verse line,', '   "And another."', '']
  lines += sum(([f'Chapter {n}', '', f'Text of {n}.', ''] for n in range(2, 22)), [])
  lines += ['(End of volume one.)', '', 'THE END', '', 'Anything after is dropped.']
  chapters = austen.structure('Book', lines)
  assert [c.number for c in chapters] == list(range(22))
  assert chapters[0].paragraphs == ('TITLE', 'Front matter line one continued.')
  assert chapters[1].heading == 'VOLUME I\nCHAPTER I'
  assert chapters[1].paragraphs == ('First paragraph wraps onto a second line.',
                                    'He read:\n"A verse line,\n"And another."')
  assert chapters[1].text == chapters[1].paragraphs[0] + '\n\n' + chapters[1].paragraphs[1]
  assert chapters[21].paragraphs == ('Text of 21.',) and chapters[21].heading == 'Chapter 21'
  with pytest.raises(ValueError, match='expected >= 20 non-empty chapters'):
    austen.structure('Short', lines[:30])


@pytest.mark.long
def test_extract_from_the_debian_package(tmp_path):
  """Downloads the pinned package (skipped without apt-get or network) and re-extracts."""
  if not (shutil.which('apt-get') and shutil.which('dpkg-deb')):
    pytest.skip('apt-get or dpkg-deb not available')
  try:
    deb = austen.download(tmp_path)
  except assets.AssetError as e:
    if any(s in str(e) for s in ('Failed to fetch', 'resolve', 'connect', 'Unable to locate')):
      pytest.skip(f'package archive unreachable: {e}')
    raise
  lines = austen.read_lines(deb)
  assert list(lines) == list(austen.BOOKS)
  assert sum(len(line) + 1 for book in lines.values() for line in book) == 4_025_028
  out = austen.extract(deb, tmp_path / 'austen.jsonl.gz')
  assert gzip.decompress(out.read_bytes()) == gzip.decompress(austen.DATA_PATH.read_bytes())
  assert out.read_bytes() == austen.DATA_PATH.read_bytes()
