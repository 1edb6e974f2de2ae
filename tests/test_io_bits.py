"""Packed codes: known bytes, round trips at every width, clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from peftjax.io import bits


def test_known_bytes_most_significant_bits_first():
  np.testing.assert_array_equal(bits.pack([3, 0, 1, 2], 2), [0b11000110])
  np.testing.assert_array_equal(bits.pack([1, 15, 7], 4), [0x1F, 0x70])
  np.testing.assert_array_equal(bits.pack([5, 255], 8), [5, 255])
  np.testing.assert_array_equal(bits.pack([1, 0, 1], 1), [0b10100000])


def test_one_bit_codes_pack_as_numpy_packbits():
  mask = np.random.default_rng(0).random((7, 5)) > 0.5
  np.testing.assert_array_equal(bits.pack(mask, 1), np.packbits(mask.ravel()))


@pytest.mark.parametrize('width', range(1, 9))
@pytest.mark.parametrize('count', [1, 13, 64])
def test_round_trip(width, count):
  codes = np.random.default_rng(width * 100 + count).integers(0, 2 ** width, count)
  packed = bits.pack(codes, width)
  assert packed.dtype == np.uint8 and packed.shape == (-(-count * width // 8),)
  np.testing.assert_array_equal(bits.unpack(packed, width, count), codes)


def test_errors():
  with pytest.raises(ValueError, match=r'4-bit codes must lie in \[0, 16\), got values in '
                     r'\[0, 16\]'):
    bits.pack([0, 16], 4)
  with pytest.raises(ValueError, match='1 to 8 bits each, got bits=9'):
    bits.pack([0], 9)
  with pytest.raises(ValueError, match='5 codes of 2 bits need 2 bytes, got 1'):
    bits.unpack(np.zeros(1, np.uint8), 2, 5)
