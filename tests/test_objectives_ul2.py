"""UL2's denoisers against T5's algorithm, hand-worked cases and measured statistics."""
from __future__ import annotations

import collections

import numpy as np
import pytest
from scipy import stats

from peftjax.objectives import ul2

VOCAB = 32100
SENTINELS = ul2.t5_sentinel_ids(VOCAB, 400)
PARADIGM_IDS = {'[NLU]': 5, '[NLG]': 6, '[S2S]': 7}


def t5_reference_mask(length, noise_density, mean_noise_span_length, shuffle):
  """T5's TF `random_spans_noise_mask` (random_roll=False) op by op in numpy; `shuffle`
  stands in for `seqio.stateless_shuffle`, segment sums are written out with np.add.at."""
  if noise_density == 0.0:
    return np.zeros(length, bool)
  orig_length = length
  length = max(length, 2)
  num_noise_tokens = int(np.round(np.float32(length) * np.float32(noise_density)))
  num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
  num_noise_spans = int(np.round(np.float32(num_noise_tokens)
                                 / np.float32(mean_noise_span_length)))
  num_noise_spans = max(num_noise_spans, 1)
  num_nonnoise_tokens = length - num_noise_tokens

  def random_segmentation(num_items, num_segments):
    first_in_segment = np.pad(
        shuffle((np.arange(num_items - 1) < num_segments - 1).astype(np.int32)), [[1, 0]])
    segment_id = np.cumsum(first_in_segment)
    segment_length = np.zeros(segment_id[-1] + 1, np.int64)
    np.add.at(segment_length, segment_id, 1)
    return segment_length

  noise_span_lengths = random_segmentation(num_noise_tokens, num_noise_spans)
  nonnoise_span_lengths = random_segmentation(num_nonnoise_tokens, num_noise_spans)
  interleaved = np.reshape(np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1),
                           [num_noise_spans * 2])
  span_starts = np.cumsum(interleaved)[:-1]
  span_start_indicator = np.zeros(length, np.int64)
  np.add.at(span_start_indicator, span_starts, 1)
  span_num = np.cumsum(span_start_indicator)
  return (span_num % 2 == 1)[:orig_length]


def runs(mask):
  mask = np.asarray(mask, bool)
  return int(np.count_nonzero(mask[1:] & ~mask[:-1]) + mask[:1].sum())


# ------------------------------------------------------------------ the noise mask
@pytest.mark.parametrize('length, density, mean, noise, spans', [
    (10, 0.15, 3.0, 2, 1),    # 1.5 -> 2 tokens, 2/3 -> 1 span
    (32, 0.25, 2.0, 8, 4),    # T5's own test case: 4 spans, 8 tokens
    (20, 0.5, 3.0, 10, 3),    # 10/3 -> 3 spans
    (5, 0.5, 1.0, 2, 2),      # 2.5 rounds half to even -> 2
    (7, 0.5, 1.0, 4, 4),      # 3.5 -> 4 tokens in 4 spans, but 3 non-noise tokens: error
    (2, 0.15, 3.0, 1, 1),     # 0.3 -> 0, clipped up to 1
    (100, 0.15, 8.0, 15, 2),  # 15/8 = 1.875 -> 2
    (1000, 0.5, 64.0, 500, 8),  # 7.8125 -> 8
])
def test_noise_mask_counts_hand_worked(length, density, mean, noise, spans):
  for seed in range(20):
    if spans > length - noise:
      with pytest.raises(ValueError, match='non-noise'):
        ul2.random_spans_noise_mask(length, density, mean, np.random.default_rng(seed))
      return
    mask = ul2.random_spans_noise_mask(length, density, mean, np.random.default_rng(seed))
    assert mask.shape == (length,) and mask.dtype == bool
    assert mask.sum() == noise and runs(mask) == spans
    assert not mask[0] and mask[-1]  # Non-noise first, noise last (no random roll).


def test_noise_mask_single_span_is_the_tail_and_degenerate_lengths():
  # One span: the non-noise span comes first, so the noise is the last two tokens.
  mask = ul2.random_spans_noise_mask(10, 0.15, 3.0, np.random.default_rng(0))
  np.testing.assert_array_equal(mask, [False] * 8 + [True] * 2)
  np.testing.assert_array_equal(ul2.random_spans_noise_mask(1, 0.15, 3.0, np.random.default_rng(0)),
                                [False])  # T5 computes length 2 and cuts the mask back.
  assert not ul2.random_spans_noise_mask(32, 0.0, 2.0, np.random.default_rng(0)).any()


@pytest.mark.parametrize('length, density, mean', [
    (10, 0.15, 3.0), (32, 0.25, 2.0), (57, 0.5, 3.0), (200, 0.15, 8.0), (513, 0.5, 64.0),
    (777, 0.15, 32.0), (2, 0.5, 3.0), (1, 0.15, 3.0), (64, 0.0, 3.0)])
def test_noise_mask_equals_t5_transcription_with_the_same_draws(length, density, mean):
  for seed in range(10):
    ours = ul2.random_spans_noise_mask(length, density, mean, np.random.default_rng(seed))
    reference_rng = np.random.default_rng(seed)
    ref = t5_reference_mask(length, density, mean, reference_rng.permutation)
    np.testing.assert_array_equal(ours, ref)


def test_noise_mask_is_uniform_over_its_segmentations():
  # Length 8, density 0.5, mean 2: 4 noise and 4 non-noise tokens, each cut into 2 non-empty
  # spans: 3 x 3 = 9 masks, all equally likely.
  rng = np.random.default_rng(1)
  counts = collections.Counter(
      ul2.random_spans_noise_mask(8, 0.5, 2.0, rng).tobytes() for _ in range(4500))
  assert len(counts) == 9
  assert stats.chisquare(list(counts.values())).pvalue > 1e-3


# ------------------------------------------------------------------ corruption
def test_corrupt_matches_t5_sentinel_example(monkeypatch):
  # T5's noise_span_to_unique_sentinel test: mask [x x . . x .], vocab 1000 -> 999, 998.
  tokens = np.array([10, 11, 12, 13, 14, 15], np.int32)
  mask = np.array([True, True, False, False, True, False])
  sentinels = ul2.t5_sentinel_ids(1000, 10)
  np.testing.assert_array_equal(ul2._span_to_sentinel(tokens, mask, sentinels),
                                [999, 12, 13, 998, 15])
  # The module docstring's example: tokens a..f, mask . . x x . x.
  mask = np.array([False, False, True, True, False, True])
  monkeypatch.setattr(ul2, 'random_spans_noise_mask', lambda *a: mask)
  d = ul2.denoiser('R', 0.15, 3.0)
  inputs, targets = ul2.corrupt(tokens, d, np.random.default_rng(0), sentinel_ids=sentinels,
                                paradigm_id=7)
  np.testing.assert_array_equal(inputs, [7, 10, 11, 999, 14, 998])
  np.testing.assert_array_equal(targets, [999, 12, 13, 998, 15])
  assert inputs.dtype == targets.dtype == np.int32
  np.testing.assert_array_equal(ul2.reconstruct(inputs, targets, sentinels, paradigm_id=7),
                                tokens)


def test_corrupt_one_span_case_and_prefix_split_by_hand():
  tokens = np.arange(100, 110)
  inputs, targets = ul2.corrupt(tokens, ul2.UL2.denoisers[0], np.random.default_rng(3),
                                sentinel_ids=SENTINELS)
  np.testing.assert_array_equal(inputs, [*range(100, 108), VOCAB - 1])
  np.testing.assert_array_equal(targets, [VOCAB - 1, 108, 109])
  inputs, targets = ul2.corrupt(tokens[:1], ul2.UL2.denoisers[0], np.random.default_rng(3),
                                sentinel_ids=SENTINELS)  # T5: one token stays, one sentinel
  np.testing.assert_array_equal(inputs, [100])
  np.testing.assert_array_equal(targets, [VOCAB - 1])
  np.testing.assert_array_equal(ul2.reconstruct(inputs, targets, SENTINELS), [100])


@pytest.mark.parametrize('density, lo', [(0.5, 1), (0.25, 4)])  # round(0.5 * 9) = 4 (even)
def test_prefix_split_is_uniform_over_t5_bounds(density, lo):
  rng = np.random.default_rng(2)
  ks = np.array([ul2.random_prefix_length(10, density, rng) for _ in range(6000)])
  assert ks.min() == lo and ks.max() == 9
  assert stats.chisquare(np.bincount(ks)[lo:]).pvalue > 1e-3
  assert ul2.random_prefix_length(1, 0.5, rng) == 0


def test_corrupt_errors():
  d = ul2.denoiser('R', 0.15, 3.0)
  tokens = np.arange(1, 101)  # 15 noise tokens in 5 spans
  with pytest.raises(ValueError, match='needs 5 sentinels, got 4'):
    ul2.corrupt(tokens, d, np.random.default_rng(0), sentinel_ids=SENTINELS[:4])
  ul2.corrupt(tokens, d, np.random.default_rng(0), sentinel_ids=SENTINELS[:5])
  with pytest.raises(ValueError, match='sentinel id 32099'):
    ul2.corrupt(np.array([1, VOCAB - 1, 2]), d, np.random.default_rng(0),
                sentinel_ids=SENTINELS)
  with pytest.raises(ValueError, match='distinct'):
    ul2.corrupt(tokens, d, np.random.default_rng(0), sentinel_ids=[9000] * 10)
  with pytest.raises(ValueError, match='non-empty 1-D'):
    ul2.corrupt(np.zeros(0, int), d, np.random.default_rng(0), sentinel_ids=SENTINELS)
  with pytest.raises(ValueError, match='do not match'):
    ul2.reconstruct([1, VOCAB - 2], [VOCAB - 1, 3], SENTINELS)


# ------------------------------------------------------------------ the mixture, measured
def measure(mixture, n, paradigm_ids, seed=0):
  """n examples drawn from `mixture` on random texts of 512..1023 tokens: per denoiser the
  noise tokens, spans and lengths read off the outputs; every example checked."""
  rng = np.random.default_rng(seed)
  seen = collections.defaultdict(lambda: collections.defaultdict(list))
  for _ in range(n):
    tokens = rng.integers(10, 30000, rng.integers(512, 1024)).astype(np.int32)
    inputs, targets, i = mixture.sample(tokens, rng, sentinel_ids=SENTINELS,
                                        paradigm_ids=paradigm_ids)
    d = mixture.denoisers[i]
    paradigm_id = None
    if paradigm_ids is not None:
      paradigm_id = paradigm_ids[d.paradigm]
      assert inputs[0] == paradigm_id and paradigm_id not in inputs[1:]
    else:
      assert not np.isin(inputs, list(PARADIGM_IDS.values())).any()
    assert np.array_equal(
        ul2.reconstruct(inputs, targets, SENTINELS, paradigm_id=paradigm_id), tokens)
    body = inputs[1:] if paradigm_id is not None else inputs
    in_sent = body[body >= SENTINELS.min()]  # The texts hold ids below 30000 only.
    tg_sent = targets[targets >= SENTINELS.min()]
    m = seen[i]
    m['length'].append(len(tokens))
    if d.kind == 'S':
      assert not len(in_sent) and not len(tg_sent)
      assert 1 <= len(body) <= len(tokens) - 1
      m['noise'].append(len(targets))
      continue
    # T5 sentinels: extra_id_0, 1, ... = the top ids, strictly descending, same order in both.
    assert np.array_equal(in_sent, SENTINELS[:len(in_sent)])
    assert np.all(np.diff(in_sent) < 0)
    assert np.array_equal(tg_sent, in_sent)
    assert targets[0] == SENTINELS[0] and body[-1] == in_sent[-1]
    m['noise'].append(len(targets) - len(tg_sent))
    m['spans'].append(len(in_sent))
  return seen


def test_ul2_mixture_rates_spans_frequencies_and_round_trip():
  n = 10_000
  seen = measure(ul2.UL2, n, PARADIGM_IDS)
  for i, d in enumerate(ul2.UL2.denoisers):
    m = seen[i]
    rate = np.sum(m['noise']) / np.sum(m['length'])
    if d.kind == 'S':  # The split is uniform in [1, L-1]: half the tokens on average.
      assert rate == pytest.approx(0.5, rel=0.05), d.name
      continue
    assert rate == pytest.approx(d.noise_density, rel=0.05), d.name
    assert np.sum(m['noise']) / np.sum(m['spans']) == pytest.approx(d.mean_span, rel=0.05), d.name
  counts = [len(seen[i]['length']) for i in range(7)]
  assert sum(counts) == n
  assert stats.chisquare(counts, np.full(7, n / 7)).pvalue > 1e-3


def test_paradigm_tokens_absent_when_disabled():
  seen = measure(ul2.UL2, 300, None, seed=1)
  assert len(seen) == 7


def test_mixture_sampling_follows_weights():
  rng = np.random.default_rng(5)
  n = 20_000
  counts = np.bincount([ul2.UL2R.choose(rng) for _ in range(n)], minlength=4)
  assert ul2.UL2R.weights == (0.25, 0.125, 0.125, 0.5)
  assert stats.chisquare(counts, n * np.array(ul2.UL2R.weights)).pvalue > 1e-3
  # A wrong assignment of weights to denoisers is detected by the same test.
  assert stats.chisquare(counts, n * np.array([0.125, 0.25, 0.125, 0.5])).pvalue < 1e-6


# ------------------------------------------------------------------ presets and configs
def test_presets_are_the_papers():
  got = [(d.kind, d.noise_density, d.mean_span, d.paradigm) for d in ul2.UL2.denoisers]
  assert got == [('R', 0.15, 3.0, '[NLU]'), ('R', 0.15, 8.0, '[NLU]'), ('X', 0.5, 3.0, '[NLG]'),
                 ('X', 0.5, 8.0, '[NLG]'), ('X', 0.15, 64.0, '[NLG]'),
                 ('X', 0.5, 64.0, '[NLG]'), ('S', 0.5, None, '[S2S]')]
  assert ul2.UL2.weights == pytest.approx([1 / 7] * 7)
  got = [(d.kind, d.noise_density, d.mean_span) for d in ul2.UL2R.denoisers]
  assert got == [('R', 0.15, 3.0), ('X', 0.15, 32.0), ('X', 0.5, 3.0), ('S', 0.5, None)]
  assert ul2.UL2.paradigm_tokens == ('[NLU]', '[NLG]', '[S2S]')


def test_make_mixture_from_config():
  assert ul2.make_mixture('UL2') == ul2.UL2
  mix = ul2.make_mixture('ul2', weights=[1, 1, 1, 1, 1, 1, 3], paradigm_tokens={'S': '<s>'})
  assert mix.weights[-1] == pytest.approx(1 / 3)
  assert [d.paradigm for d in mix.denoisers] == [None] * 6 + ['<s>']
  mix = ul2.make_mixture([{'kind': 'R', 'noise_density': 0.15, 'mean_span': 3},
                          {'kind': 'X', 'noise_density': 0.5, 'mean_span': 32,
                           'paradigm': None, 'weight': 3},
                          {'kind': 'S', 'name': 'prefix', 'weight': 4}])
  assert [d.name for d in mix.denoisers] == ['R(0.15,3)', 'X(0.5,32)', 'prefix']
  assert [d.paradigm for d in mix.denoisers] == ['[NLU]', None, '[S2S]']
  assert mix.weights == pytest.approx([0.125, 0.375, 0.5])
  with pytest.raises(ValueError, match="unknown UL2 mixture preset 'ul3'; known: ul2, ul2r"):
    ul2.make_mixture('ul3')
  with pytest.raises(ValueError, match="unknown kind 'Q'"):
    ul2.make_mixture([{'kind': 'Q', 'noise_density': 0.1, 'mean_span': 3}])
  with pytest.raises(ValueError, match='keys among'):
    ul2.make_mixture([{'kind': 'R', 'rate': 0.1}])
  with pytest.raises(ValueError, match='mean_span must be >= 1, got None'):
    ul2.make_mixture([{'kind': 'X', 'noise_density': 0.5}])
  with pytest.raises(ValueError, match='one weight per denoiser, got 7 denoisers and 2'):
    ul2.make_mixture('ul2', weights=[1, 2])
  with pytest.raises(ValueError, match='no id for paradigm token'):
    ul2.UL2.sample(np.arange(20), np.random.default_rng(0), sentinel_ids=SENTINELS,
                   paradigm_ids={'[NLU]': 1})


def test_fit_length_matches_t5_random_spans_helper():
  # T5's test: inputs 64 (EOS included), density 0.2, mean 2 -> 70 tokens, targets 22; mean 1
  # -> 63 tokens, targets 27. Without EOS: inputs 63 and targets one less.
  for mean, tokens, targets in [(2.0, 70, 22), (1.0, 63, 27)]:
    d = ul2.Denoiser('t5', 'R', 0.2, mean, None)
    assert ul2.fit_length(63, targets - 1, d) == tokens
  for d in ul2.UL2.denoisers:
    n = ul2.fit_length(512, 256, d)
    for seed in range(5):
      inputs, targets = ul2.corrupt(np.arange(10, 10 + n), d, np.random.default_rng(seed),
                                    sentinel_ids=SENTINELS, paradigm_id=5)
      assert len(inputs) <= 512 and len(targets) <= 256
      if d.kind != 'S':
        assert (len(inputs), len(targets)) == ul2.corrupted_lengths(n, d)
