"""A small reader for R's XDR serialisation and R's lazy-load databases (`.rdx` + `.rdb`).

An R package with `LazyData: true` keeps each data object in `data/Rdata.rdb` as one
chunk: a 4-byte big-endian length of the serialised bytes, then their zlib stream. The
index `data/Rdata.rdx` is a gzipped serialisation of the list `(variables, references,
compressed)`, where `variables` maps each object's name to its chunk's `(offset, length)`.

Supported are the types data sets are made of: NULL, symbols, pairlists (attributes),
character vectors (STRSXP of CHARSXP), logical, integer and double vectors and lists
(VECSXP). Vectors come back as Python lists (NA strings as None); a list with a `names`
attribute comes back as a dict, so an index or a data frame reads as `{name: value}`.
Other attributes are dropped. Anything else (closures, environments, ALTREP, S4) raises.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import pathlib
import struct
import zlib
from typing import Any

# SEXP type codes (R's Rinternals.h) and the pseudo-types of serialize.c.
SYMSXP, LISTSXP, LANGSXP, CHARSXP = 1, 2, 6, 9
LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP = 10, 13, 14, 16, 19, 20
NILVALUE_SXP, REFSXP = 254, 255
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10
_LATIN1, _BYTES = 1 << 2, 1 << 1  # CHARSXP encoding bits of the "levels" field.


class RDataError(ValueError):
  """The bytes are not an R serialisation this reader understands."""


class _Stream:
  """Reads one XDR ('X\\n') serialisation: header, then one item."""

  def __init__(self, data: bytes):
    self.data, self.pos, self.refs = data, 0, []

  def take(self, n: int) -> bytes:
    if self.pos + n > len(self.data):
      raise RDataError(f'serialisation ends at byte {len(self.data)}, '
                       f'needed {n} more bytes at {self.pos}')
    out = self.data[self.pos:self.pos + n]
    self.pos += n
    return out

  def int(self) -> int:
    return struct.unpack('>i', self.take(4))[0]

  def length(self) -> int:
    n = self.int()
    if n == -1:  # Long vector: upper and lower 32 bits follow.
      n = (self.int() << 32) + self.int()
    if n < 0:
      raise RDataError(f'negative vector length {n} at byte {self.pos}')
    return n

  def header(self) -> None:
    fmt = self.take(2)
    if fmt != b'X\n':
      raise RDataError(f'expected the XDR format mark b"X\\n", got {fmt!r}')
    version = self.int()
    self.int(), self.int()  # Writer's R version, oldest R version that can read it.
    if version == 3:
      self.take(self.int())  # Native encoding name; CHARSXPs carry their own flags.
    elif version != 2:
      raise RDataError(f'expected serialisation version 2 or 3, got {version}')

  def item(self) -> Any:
    return self._item(self.int())

  def _item(self, flags: int) -> Any:
    kind = flags & 0xFF
    if kind == NILVALUE_SXP:
      return None
    if kind == REFSXP:
      index = (flags >> 8) or self.int()
      if not 1 <= index <= len(self.refs):
        raise RDataError(f'reference {index} outside the {len(self.refs)} seen so far')
      return self.refs[index - 1]
    if kind == SYMSXP:
      name = self.item()
      self.refs.append(name)
      return name
    if kind in (LISTSXP, LANGSXP):
      return self._pairlist(flags)
    if kind == CHARSXP:
      n = self.int()
      if n == -1:
        return None  # NA_character_
      raw = self.take(n)
      levels = flags >> 12
      return raw.decode('latin-1' if levels & (_LATIN1 | _BYTES) else 'utf-8')
    if kind in (LGLSXP, INTSXP):
      n = self.length()
      value = [None if v == -2**31 else v for v in struct.unpack(f'>{n}i', self.take(4 * n))]
    elif kind == REALSXP:
      n = self.length()
      value = list(struct.unpack(f'>{n}d', self.take(8 * n)))
    elif kind in (STRSXP, VECSXP, EXPRSXP):
      value = [self.item() for _ in range(self.length())]
    else:
      raise RDataError(f'unsupported R type {kind} (flags {flags:#x}) at byte {self.pos - 4}')
    attributes = self.item() if flags & _HAS_ATTR else None
    names = (attributes or {}).get('names')
    if kind == VECSXP and names is not None:
      if len(names) != len(value):
        raise RDataError(f'{len(names)} names for a list of {len(value)}')
      return dict(zip(names, value))
    return value

  def _pairlist(self, flags: int) -> dict[str, Any]:
    """A pairlist (attributes, mostly) as {tag: value}; untagged cells get their index."""
    out = {}
    while True:
      if flags & _HAS_ATTR:
        self.item()
      tag = self.item() if flags & _HAS_TAG else str(len(out))
      out[tag] = self.item()
      flags = self.int()
      if flags & 0xFF == NILVALUE_SXP:
        return out
      if flags & 0xFF not in (LISTSXP, LANGSXP):
        raise RDataError(f'pairlist continues with type {flags & 0xFF}, expected a cell or NULL')


def unserialize(data: bytes) -> Any:
  """The object of one uncompressed XDR serialisation (what `serialize(x, NULL)` writes)."""
  stream = _Stream(data)
  stream.header()
  value = stream.item()
  if stream.pos != len(data):
    raise RDataError(f'{len(data) - stream.pos} bytes left after the object')
  return value


def _decompress(chunk: bytes, compressed: int) -> bytes:
  """One lazy-load chunk: 4-byte length, then (type byte, for types 2 and 3) the stream."""
  if len(chunk) < 5:
    raise RDataError(f'a lazy-load chunk has at least 5 bytes, got {len(chunk)}')
  size = struct.unpack('>I', chunk[:4])[0]
  if compressed in (1, True):
    out = zlib.decompress(chunk[4:])
  elif compressed in (2, 3):
    kind, body = chunk[4:5], chunk[5:]
    decoders = {b'2': bz2.decompress, b'Z': lzma.decompress, b'0': bytes}
    if kind not in decoders:
      raise RDataError(f'unknown chunk compression {kind!r}, expected one of {list(decoders)}')
    out = decoders[kind](body)
  else:
    raise RDataError(f'expected compression type 1, 2 or 3, got {compressed!r}')
  if len(out) != size:
    raise RDataError(f'chunk header says {size} bytes, decompressed {len(out)}')
  return out


def read_lazyload(base: str | os.PathLike) -> dict[str, Any]:
  """Every object of the lazy-load database `base` (`base.rdx` + `base.rdb`), by name.

  For example `read_lazyload('.../janeaustenr/data/Rdata')['emma']` is a list of lines.
  """
  base = pathlib.Path(base)
  index = unserialize(gzip.decompress(base.with_suffix('.rdx').read_bytes()))
  if not isinstance(index, dict) or 'variables' not in index:
    raise RDataError(f'{base}.rdx: expected a list with "variables", got {type(index).__name__}')
  compressed = (index.get('compressed') or [1])[0]
  db = base.with_suffix('.rdb').read_bytes()
  out = {}
  for name, (offset, length) in index['variables'].items():
    if offset + length > len(db):
      raise RDataError(f'{base}.rdb: {name!r} at {offset}+{length} beyond {len(db)} bytes')
    out[name] = unserialize(_decompress(db[offset:offset + length], compressed))
  return out
