"""Codes of a few bits each, packed into bytes for adapter files (mask tuning's binary masks,
low-precision adapters' quantised weights).

`pack(codes, bits)` writes each code's `bits` bits, most significant first, one code after
another, and pads the last byte with zeros (`np.packbits` order: 1-bit codes pack exactly as
`np.packbits` of the mask); `unpack` reads `count` codes back.
"""
from __future__ import annotations

import numpy as np


def _check_bits(bits: int):
  if not (isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 8):
    raise ValueError(f'codes are packed with 1 to 8 bits each, got bits={bits!r}')


def pack(codes, bits: int) -> np.ndarray:
  """`codes` (ints in [0, 2**bits), any shape, read in C order) as ceil(size * bits / 8)
  bytes (uint8, 1-D)."""
  _check_bits(bits)
  codes = np.asarray(codes).ravel()
  if codes.size and (codes.min() < 0 or codes.max() >= 2 ** bits):
    raise ValueError(f'{bits}-bit codes must lie in [0, {2 ** bits}), got values in '
                     f'[{codes.min()}, {codes.max()}]')
  shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
  planes = (codes.astype(np.uint8)[:, None] >> shifts) & 1
  return np.packbits(planes.ravel())


def unpack(packed, bits: int, count: int) -> np.ndarray:
  """The first `count` codes (uint8, 1-D) of bytes written by `pack(codes, bits)`."""
  _check_bits(bits)
  packed = np.asarray(packed, np.uint8).ravel()
  if packed.size * 8 < count * bits:
    raise ValueError(f'{count} codes of {bits} bits need {-(-count * bits // 8)} bytes, got '
                     f'{packed.size}')
  planes = np.unpackbits(packed, count=count * bits).reshape(count, bits)
  shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
  return (planes << shifts).sum(axis=1, dtype=np.uint8)
