"""Packing and feature conversion, checked with the models' own attention masks."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.data import packing
from peftjax.models.attention import make_mask
from peftjax.objectives import ul2

BOS, START, PAD = 1, 2, 0


def random_examples(seed, n, max_in=12, max_tg=9):
  rng = np.random.default_rng(seed)
  return [(rng.integers(10, 99, rng.integers(0, max_in)).astype(np.int32),
           rng.integers(100, 199, rng.integers(1, max_tg)).astype(np.int32)) for _ in range(n)]


def reference_first_fit(sizes, capacity):
  """First fit written plainly: a list of rows, each scanned from the first."""
  rows, placed = [], []
  for need in sizes:
    for r, used in enumerate(rows):
      if all(u + n <= c for u, n, c in zip(used, need, capacity)):
        break
    else:
      rows.append([0] * len(capacity))
      r = len(rows) - 1
    placed.append((r, list(rows[r])))
    rows[r] = [u + n for u, n in zip(rows[r], need)]
  return placed


def segments_of(batch, seg_key='segment_ids'):
  """(row, start, end) of every packed example, read off the segment ids."""
  out = []
  for r, seg in enumerate(batch[seg_key]):
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      assert len(where) and np.all(np.diff(where) == 1), 'a segment must be contiguous'
      out.append((r, where[0], where[-1] + 1))
  return out


def reachable(mask):
  """[B, L, L]: key j's token can reach query i's output through any number of layers."""
  reach = mask | np.eye(mask.shape[-1], dtype=bool)
  while True:
    nxt = (reach.astype(np.int32) @ reach.astype(np.int32)) > 0
    if np.array_equal(nxt, reach):
      return reach
    reach = nxt


def leaks(batch, prefix):
  """Weighted positions that can see, at any depth, a token read at a later position (the
  token they predict is read one position later)."""
  mask = np.asarray(make_mask(jnp.asarray(batch['segment_ids']), causal=True,
                              prefix=jnp.asarray(prefix)))[:, 0]
  later = np.triu(np.ones(mask.shape[-1:] * 2, bool), k=1)
  return (reachable(mask) & later & (batch['weights'] > 0)[:, :, None]).any(axis=-1)


# ------------------------------------------------------------------ first fit
def test_first_fit_matches_plain_reference():
  rng = np.random.default_rng(0)
  sizes = rng.integers(1, 9, (300, 1))
  row, offset = packing.first_fit(sizes, [16])
  assert [(int(r), o.tolist()) for r, o in zip(row, offset)] == reference_first_fit(
      sizes.tolist(), [16])
  sizes = np.stack([rng.integers(0, 9, 300), rng.integers(1, 6, 300)], axis=1)
  row, offset = packing.first_fit(sizes, [12, 8])
  assert [(int(r), o.tolist()) for r, o in zip(row, offset)] == reference_first_fit(
      sizes.tolist(), [12, 8])
  # By hand: 5 -> row 0; 4 -> new row 1; 3 fills row 0; 4 fills row 1; 1 -> new row 2.
  row, offset = packing.first_fit([[5], [4], [3], [4], [1]], [8])
  assert row.tolist() == [0, 1, 0, 1, 2] and offset[:, 0].tolist() == [0, 0, 5, 4, 0]
  with pytest.raises(ValueError, match=r'sizes must lie in \[0, \[8\]\]'):
    packing.first_fit([[9]], [8])


# ------------------------------------------------------------------ decoder-only
def test_prefix_lm_layout_by_hand():
  ex = [([11, 12, 13], [21, 22]), ([14], [23, 24, 25]), ([1, 2, 3, 4, 5, 6, 7], [8, 9]),
        ([5] * 8, [6])]
  batch, st = packing.prefix_lm(ex, 8, bos_id=BOS, pad_id=PAD)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      'input_ids': ((3, 8), np.int32), 'targets': ((3, 8), np.int32),
      'segment_ids': ((3, 8), np.int32), 'positions': ((3, 8), np.int32),
      'prefix': ((3, 8), bool), 'weights': ((3, 8), np.float32)}
  np.testing.assert_array_equal(batch['targets'], [[11, 12, 13, 21, 22, 0, 0, 0],
                                                   [14, 23, 24, 25, 0, 0, 0, 0],
                                                   [1, 2, 3, 4, 5, 6, 7, 8]])
  np.testing.assert_array_equal(batch['input_ids'], [[1, 11, 12, 13, 21, 0, 0, 0],
                                                     [1, 14, 23, 24, 0, 0, 0, 0],
                                                     [1, 1, 2, 3, 4, 5, 6, 7]])
  np.testing.assert_array_equal(batch['weights'], [[0, 0, 0, 1, 1, 0, 0, 0],
                                                   [0, 1, 1, 1, 0, 0, 0, 0],
                                                   [0, 0, 0, 0, 0, 0, 0, 1]])
  np.testing.assert_array_equal(batch['prefix'], [[1, 1, 1, 1, 0, 0, 0, 0],
                                                  [1, 1, 0, 0, 0, 0, 0, 0],
                                                  [1, 1, 1, 1, 1, 1, 1, 1]])
  # The third example loses its last target; the fourth has no room for a target: dropped.
  assert st == packing.PackStats(examples=4, rows=3, dropped=1, truncated=1, lost_tokens=10,
                                 tokens=17, padding=7)


@pytest.mark.parametrize('seed', [0, 1])
def test_prefix_lm_packed_properties_with_the_model_mask(seed):
  ex = random_examples(seed, 60)
  batch, st = packing.prefix_lm(ex, 24, bos_id=BOS, pad_id=PAD)
  assert st.dropped == st.truncated == 0 and st.examples == 60
  assert st.tokens == sum(len(a) + len(b) for a, b in ex)
  assert st.padding == int((batch['segment_ids'] == 0).sum())
  spans = segments_of(batch)
  assert len(spans) == 60
  by_content = {}  # Each example found by its tokens (duplicates taken one by one).
  for r, s, e in spans:
    by_content.setdefault(batch['targets'][r, s:e].tobytes(), []).append((r, s, e))
  for inputs, targets in ex:
    r, s, e = by_content[np.concatenate([inputs, targets]).astype(np.int32).tobytes()].pop()
    n_in = len(inputs)
    np.testing.assert_array_equal(batch['positions'][r, s:e], np.arange(e - s))
    assert batch['input_ids'][r, s] == BOS
    np.testing.assert_array_equal(batch['input_ids'][r, s + 1:e], batch['targets'][r, s:e - 1])
    # Loss on the targets only, and all of them.
    np.testing.assert_array_equal(batch['weights'][r, s:e], np.arange(e - s) >= n_in)
    np.testing.assert_array_equal(batch['targets'][r, s:e][batch['weights'][r, s:e] > 0],
                                  targets)
  off = batch['segment_ids'] == 0
  assert not batch['weights'][off].any() and not batch['prefix'][off].any()
  assert (batch['input_ids'][off] == PAD).all() and (batch['targets'][off] == PAD).all()

  mask = np.asarray(make_mask(jnp.asarray(batch['segment_ids']), causal=True,
                              prefix=jnp.asarray(batch['prefix'])))[:, 0]
  seg = batch['segment_ids']
  # Never across packed examples, never from or to padding.
  same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
  assert not (mask & ~same).any()
  # Bidirectional over [bos, inputs], causal after: built from the examples' lengths.
  expected = np.zeros_like(mask)
  for r, s, e in spans:
    n = e - s
    n_in = int((batch['weights'][r, s:e] == 0).sum())
    local = np.tril(np.ones((n, n), bool))
    if n_in:
      local[:n_in + 1, :n_in + 1] = True
    expected[r, s:e, s:e] = local
  np.testing.assert_array_equal(mask, expected)
  # No target token reaches, through any number of layers, the position that predicts it.
  assert not leaks(batch, batch['prefix']).any()


def test_leak_check_catches_a_prefix_one_too_long():
  batch, _ = packing.prefix_lm(random_examples(3, 30), 24, bos_id=BOS)
  assert not leaks(batch, batch['prefix']).any()
  longer = batch['prefix'] | np.pad(batch['prefix'][:, :-1], [(0, 0), (1, 0)])
  longer &= batch['segment_ids'] > 0
  assert leaks(batch, longer).any()


def test_causal_lm():
  seqs = [np.arange(10, 10 + n, dtype=np.int32) for n in (5, 3, 7, 1, 9)]
  batch, st = packing.causal_lm(seqs, 8, bos_id=BOS)
  assert st == packing.PackStats(5, 3, 0, 1, 1, 24, 0)
  assert not batch['prefix'].any()
  np.testing.assert_array_equal(batch['weights'] > 0, batch['segment_ids'] > 0)
  np.testing.assert_array_equal(batch['targets'][0], [10, 11, 12, 13, 14, 10, 11, 12])
  np.testing.assert_array_equal(batch['input_ids'][0], [1, 10, 11, 12, 13, 1, 10, 11])
  np.testing.assert_array_equal(batch['positions'][0], [0, 1, 2, 3, 4, 0, 1, 2])
  np.testing.assert_array_equal(batch['segment_ids'][0], [1, 1, 1, 1, 1, 2, 2, 2])
  assert not leaks(batch, batch['prefix']).any()


def test_ul2_examples_pack_and_round_trip():
  rng = np.random.default_rng(0)
  sentinels = ul2.t5_sentinel_ids(32100, 100)
  ids = {'[NLU]': 3, '[NLG]': 4, '[S2S]': 5}
  texts = [rng.integers(10, 1000, rng.integers(20, 60)) for _ in range(40)]
  ex = [ul2.UL2.sample(t, rng, sentinel_ids=sentinels, paradigm_ids=ids)[:2] for t in texts]
  batch, st = packing.prefix_lm(ex, 128, bos_id=BOS)
  assert st.truncated == st.dropped == 0
  found = 0
  for r, s, e in segments_of(batch):
    w = batch['weights'][r, s:e] > 0
    inputs, targets = batch['targets'][r, s:e][~w], batch['targets'][r, s:e][w]
    text = ul2.reconstruct(inputs[1:], targets, sentinels)  # inputs[0]: the paradigm token
    assert inputs[0] in ids.values()
    found += any(np.array_equal(text, t) for t in texts)
  assert found == len(texts)
  assert not leaks(batch, batch['prefix']).any()


# ------------------------------------------------------------------ encoder-decoder
def test_encoder_decoder_packed_properties():
  ex = random_examples(4, 50)
  batch, st = packing.encoder_decoder(ex, 20, 12, decoder_start_id=START)
  assert {k: (v.shape[1], v.dtype) for k, v in batch.items()} == {
      'encoder_ids': (20, np.int32), 'encoder_segment_ids': (20, np.int32),
      'encoder_positions': (20, np.int32), 'decoder_input_ids': (12, np.int32),
      'targets': (12, np.int32), 'decoder_segment_ids': (12, np.int32),
      'decoder_positions': (12, np.int32), 'weights': (12, np.float32)}
  assert st.dropped == st.truncated == 0
  enc, dec = batch['encoder_segment_ids'], batch['decoder_segment_ids']
  pairs = set()
  for r in range(len(enc)):
    for s in range(1, dec[r].max() + 1):
      d = np.flatnonzero(dec[r] == s)
      e = np.flatnonzero(enc[r] == s)
      tg = batch['targets'][r, d]
      np.testing.assert_array_equal(batch['decoder_input_ids'][r, d], [START, *tg[:-1]])
      np.testing.assert_array_equal(batch['decoder_positions'][r, d], np.arange(len(d)))
      np.testing.assert_array_equal(batch['encoder_positions'][r, e], np.arange(len(e)))
      pairs.add((batch['encoder_ids'][r, e].tobytes(), tg.tobytes()))
  assert pairs == {(a.tobytes(), b.tobytes()) for a, b in ex}
  np.testing.assert_array_equal(batch['weights'] > 0, dec > 0)
  cross = np.asarray(make_mask(jnp.asarray(dec), causal=False, kv_segment_ids=jnp.asarray(enc)))
  assert not (cross[:, 0] & ~((dec[:, :, None] == enc[:, None, :]) & (dec[:, :, None] > 0))).any()
  self_mask = np.asarray(make_mask(jnp.asarray(dec), causal=True))[:, 0]
  assert not (self_mask & ~(dec[:, :, None] == dec[:, None, :])).any()


def test_encoder_decoder_truncation_counts():
  ex = [(np.arange(30), np.arange(5)), (np.arange(3), np.arange(20)), (np.arange(4), [])]
  batch, st = packing.encoder_decoder(ex, 10, 8, decoder_start_id=START)
  assert st == packing.PackStats(3, 2, 1, 2, 20 + 12 + 4, 10 + 5 + 3 + 8, 2 * 18 - 26)
  np.testing.assert_array_equal(batch['encoder_ids'][0], np.arange(10))


# ------------------------------------------------------------------ batches
def test_batches_fill_resume_and_shard():
  batch, _ = packing.causal_lm([np.arange(1, 1 + n) for n in range(1, 40)], 16)
  rows = len(batch['targets'])
  got = list(packing.batches(batch, 4, seed=1, epoch=2))
  assert len(got) == packing.num_batches(batch, 4) == -(-rows // 4)
  assert all(b['targets'].shape == (4, 16) for b in got)
  order = np.random.default_rng([1, 2]).permutation(rows)
  stacked = {k: np.concatenate([b[k] for b in got])[:rows] for k in batch}
  for k in batch:
    np.testing.assert_array_equal(stacked[k], batch[k][order])
  filler = np.concatenate([b['weights'] for b in got])[rows:]
  assert not filler.any()
  assert not np.concatenate([b['segment_ids'] for b in got])[rows:].any()
  resumed = list(packing.batches(batch, 4, seed=1, epoch=2, start=2, rows=slice(2, 4)))
  for a, b in zip(resumed, got[2:]):
    np.testing.assert_array_equal(a['input_ids'], b['input_ids'][2:4])
