"""UL2's mixture of denoisers: T5 span corruption (R, X) and prefix-LM splits (S), in numpy.

UL2: "UL2: Unifying Language Learning Paradigms" (Tay et al., arXiv 2205.05131). Span
corruption: "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (Raffel et al., arXiv 1910.10683). The UL2R mixture: "Transcending Scaling Laws
with 0.1% Extra Compute" (U-PaLM, Tay et al., arXiv 2210.11399).

This is the host side of the input pipeline. It follows the official code: UL2's
`ul2_objective` (the paper's appendix) runs T5's `span_corruption` once per R/X denoiser and
T5's `prefix_lm` for the S-denoiser, prepends the denoiser's paradigm token to the inputs and
samples the results by rate (uniform when no rates are given). So here:

- R/X: `random_spans_noise_mask`; the inputs keep the non-noise tokens and put one sentinel
  in place of each noise span (`noise_span_to_unique_sentinel`); the targets put one sentinel
  in place of each non-noise span (`nonnoise_span_to_unique_sentinel`). The mask starts with
  non-noise and ends with noise, so sentinel k precedes span k in the targets and the targets
  do not end with a sentinel: tokens `a b c d e f`, mask `. . x x . x` give inputs
  `a b <0> e <1>` and targets `<0> c d <1> f`. Sentinel k is `sentinel_ids[k]`; T5's are
  descending from the top of the vocabulary (`t5_sentinel_ids`).
- S: T5's `random_prefix_noise_mask`: the inputs are the first k tokens, the targets the rest,
  k uniform in [max(1, round((1 - 2r) (L - 1))), L - 1] (r = 0.5: uniform in [1, L - 1]).
- No EOS is appended (seqio appends it after these steps): the task adds one if it wants it.

Every draw comes from an explicit `np.random.Generator`: a corruption is a function of the
tokens and the generator's state.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

__all__ = ['PARADIGM_TOKENS', 'Denoiser', 'Mixture', 'UL2', 'UL2R', 'PRESETS', 'corrupt',
           'corrupted_lengths', 'denoiser', 'fit_length', 'make_mixture',
           'random_prefix_length', 'random_spans_noise_mask', 'reconstruct', 't5_sentinel_ids']

KINDS = ('R', 'X', 'S')
# UL2's mode-switching tokens (paper section 3.2; the released UL2 20B uses these strings).
PARADIGM_TOKENS = {'R': '[NLU]', 'X': '[NLG]', 'S': '[S2S]'}


def t5_sentinel_ids(vocab_size: int, count: int = 100) -> np.ndarray:
  """T5's sentinels `<extra_id_0>, <extra_id_1>, ...`: `vocab_size - 1, vocab_size - 2, ...`."""
  if not 0 < count < vocab_size:
    raise ValueError(f'need 0 < count < vocab_size, got count={count}, vocab_size={vocab_size}')
  return np.arange(vocab_size - 1, vocab_size - 1 - count, -1, dtype=np.int32)


# ---------------------------------------------------------------- T5's masks, transcribed
def _random_segmentation(num_items: int, num_segments: int, rng) -> np.ndarray:
  """Lengths (>= 1, summing to num_items) of a uniformly random cut into num_segments parts;
  T5 shuffles `range(num_items - 1) < num_segments - 1`: here one `rng.permutation` draw."""
  first_in_segment = np.zeros(num_items, bool)
  first_in_segment[1:] = rng.permutation(num_items - 1) < num_segments - 1
  return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def _span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
  """T5's (num_noise_tokens, num_noise_spans) for length >= 2, in float32 as TF computes."""
  num_noise = int(np.round(np.float32(length) * np.float32(noise_density)))
  num_noise = min(max(num_noise, 1), length - 1)
  return num_noise, max(int(np.round(np.float32(num_noise) / np.float32(mean_span))), 1)


def _runs(mask: np.ndarray) -> int:
  """The number of runs of True in a 1-D bool array."""
  return int(np.count_nonzero(mask[1:] & ~mask[:-1])) + int(mask[:1].sum())


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
  """T5's `random_spans_noise_mask` (t5/data/preprocessors.py): bool [length], True = noise.

  num_noise = round(length * noise_density) clipped to [1, length - 1]; num_spans =
  max(1, round(num_noise / mean_noise_span_length)) (round half to even, in float32 as in
  TF); noise and non-noise tokens are each cut into num_spans random non-empty spans, which
  alternate starting with non-noise. Lengths below 2 are computed as 2 and cut back (T5's
  guard); density 0 gives no noise. T5's option `random_roll` (roll the mask by a random
  offset) is not followed: it is off by default and in UL2's code, and a mask that starts
  with noise would misalign the sentinels of its inputs and targets. Random draws: one
  `rng.permutation` for the noise spans, then one for the non-noise spans.

  Raises:
    ValueError: if there are fewer non-noise tokens than noise spans (density near 1).
  """
  if noise_density == 0.0:
    return np.zeros(length, bool)
  orig_length, length = length, max(length, 2)
  num_noise, num_spans = _span_counts(length, noise_density, mean_noise_span_length)
  num_nonnoise = length - num_noise
  if num_spans > num_nonnoise:
    raise ValueError(f'{num_spans} noise spans need as many non-noise tokens, got '
                     f'{num_nonnoise} (length {length}, density {noise_density}, '
                     f'mean span {mean_noise_span_length})')
  noise = _random_segmentation(num_noise, num_spans, rng)
  nonnoise = _random_segmentation(num_nonnoise, num_spans, rng)
  lengths = np.stack([nonnoise, noise], axis=1).ravel()
  return np.repeat(np.tile([False, True], num_spans), lengths)[:orig_length]


def _prefix_bounds(length: int, noise_density: float) -> tuple[int, int]:
  max_inputs = length - 1
  scaled = np.round(np.float32(1 - 2 * noise_density) * np.float32(max_inputs))
  return min(max_inputs, max(1, int(scaled))), max_inputs


def random_prefix_length(length: int, noise_density: float, rng: np.random.Generator) -> int:
  """T5's `random_prefix_noise_mask` as a count: the number k of leading tokens that form the
  inputs, uniform in [max(1, round((1 - 2 noise_density)(length - 1))), length - 1], capped
  at length - 1 (so 0 for a single token). noise_density must not exceed 0.5."""
  if not 0 < noise_density <= 0.5:
    raise ValueError(f'prefix-LM noise_density must be in (0, 0.5], got {noise_density}')
  lo, hi = _prefix_bounds(length, noise_density)
  return int(rng.integers(lo, hi + 1))


# ---------------------------------------------------------------- denoisers
@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One denoiser: `kind` 'R' | 'X' (span corruption with corruption rate `noise_density` and
  mean span `mean_span`) or 'S' (prefix LM; `noise_density` 0.5 = split uniformly, as UL2);
  `paradigm` is the mode token prepended to its inputs (None: none)."""
  name: str
  kind: str
  noise_density: float
  mean_span: float | None
  paradigm: str | None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'denoiser {self.name!r}: unknown kind {self.kind!r}; expected one of '
                       f'{KINDS}')
    if self.kind == 'S':
      if not 0 < self.noise_density <= 0.5:
        raise ValueError(f'S-denoiser {self.name!r}: noise_density must be in (0, 0.5], got '
                         f'{self.noise_density}')
      if self.mean_span is not None:
        raise ValueError(f'S-denoiser {self.name!r} takes no mean_span, got {self.mean_span}')
    else:
      if not 0 < self.noise_density < 1:
        raise ValueError(f'denoiser {self.name!r}: noise_density must be in (0, 1), got '
                         f'{self.noise_density}')
      if self.mean_span is None or not self.mean_span >= 1:
        raise ValueError(f'denoiser {self.name!r}: mean_span must be >= 1, got {self.mean_span}')
    if self.paradigm is not None and not isinstance(self.paradigm, str):
      raise ValueError(f'denoiser {self.name!r}: paradigm must be a token string or None, got '
                       f'{self.paradigm!r}')


def denoiser(kind: str, noise_density: float | None = None, mean_span: float | None = None,
             *, paradigm_tokens: Mapping[str, str | None] = PARADIGM_TOKENS,
             name: str | None = None) -> Denoiser:
  """A `Denoiser` whose paradigm token is `paradigm_tokens[kind]` (absent: none) and whose
  name defaults to `R(0.15,3)` / `S`; an S-denoiser's `noise_density` defaults to 0.5."""
  if kind == 'S' and noise_density is None:
    noise_density = 0.5
  if noise_density is None:
    raise ValueError(f'a {kind!r}-denoiser needs noise_density')
  if name is None and kind != 'S' and mean_span is not None:
    name = f'{kind}({noise_density:g},{mean_span:g})'
  return Denoiser(name or kind, kind, float(noise_density),
                  None if mean_span is None else float(mean_span), paradigm_tokens.get(kind))


def _sentinel_array(sentinel_ids) -> np.ndarray:
  sentinel_ids = np.asarray(sentinel_ids)
  if sentinel_ids.ndim != 1 or not len(sentinel_ids):
    raise ValueError(f'sentinel_ids must be a non-empty 1-D list of ids, got {sentinel_ids!r}')
  return sentinel_ids


def _is_sentinel(tokens, sentinel_ids) -> np.ndarray:
  """np.isin(tokens, sentinel_ids), by a lookup table over the sentinels' id range."""
  lo, hi = int(sentinel_ids.min()), int(sentinel_ids.max())
  if hi - lo > 1 << 22:
    return np.isin(tokens, sentinel_ids)
  table = np.zeros(hi - lo + 2, bool)  # The last entry stands for every id out of range.
  table[sentinel_ids - lo] = True
  index = tokens.astype(np.int64) - lo
  return table[np.where((index < 0) | (index > hi - lo), hi - lo + 1, index)]


def _span_to_sentinel(tokens, mask, sentinel_ids) -> np.ndarray:
  """T5's `noise_span_to_unique_sentinel`: the k-th run of True becomes sentinel_ids[k]."""
  prev = np.concatenate([[False], mask[:-1]])
  first = mask & ~prev
  out = tokens.copy()
  out[first] = sentinel_ids[:int(first.sum())]
  return out[~(mask & prev)]


def corrupt(tokens, d: Denoiser, rng: np.random.Generator, *, sentinel_ids,
            paradigm_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) of one example under denoiser `d` (see the module docstring).

  Args:
    tokens: 1-D int array, non-empty, holding none of `sentinel_ids`.
    d: the denoiser.
    rng: the generator the mask or split is drawn from.
    sentinel_ids: the ids of sentinels 0, 1, ... in that order.
    paradigm_id: prepended to the inputs if given.

  Raises:
    ValueError: on bad tokens, or if the mask needs more sentinels than given.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not len(tokens):
    raise ValueError(f'tokens must be a non-empty 1-D array, got shape {tokens.shape}')
  sentinel_ids = _sentinel_array(sentinel_ids)
  clash = _is_sentinel(tokens, sentinel_ids)
  if clash.any():
    raise ValueError(f'tokens hold sentinel id {tokens[clash][0]}; sentinels must not occur '
                     'in the text')
  if d.kind == 'S':
    k = random_prefix_length(len(tokens), d.noise_density, rng)
    inputs, targets = tokens[:k], tokens[k:]
  else:
    mask = random_spans_noise_mask(len(tokens), d.noise_density, d.mean_span, rng)
    need = max(_runs(mask), _runs(~mask))
    if need > len(sentinel_ids):
      raise ValueError(f'{d.name} on {len(tokens)} tokens needs {need} sentinels, got '
                       f'{len(sentinel_ids)}')
    if len(set(sentinel_ids[:need].tolist())) < need:
      raise ValueError(f'sentinel_ids must be distinct, got {sentinel_ids[:need].tolist()}')
    inputs = _span_to_sentinel(tokens, mask, sentinel_ids)
    targets = _span_to_sentinel(tokens, ~mask, sentinel_ids)
  if paradigm_id is not None:
    if paradigm_id in sentinel_ids:
      raise ValueError(f'paradigm id {paradigm_id} is also a sentinel id')
    inputs = np.concatenate([np.array([paradigm_id], tokens.dtype), inputs])
  return inputs.astype(tokens.dtype), targets.astype(tokens.dtype)


def reconstruct(inputs, targets, sentinel_ids, *, paradigm_id: int | None = None) -> np.ndarray:
  """The tokens `corrupt` started from: each sentinel of the inputs replaced by the span that
  follows the same sentinel in the targets; a prefix-LM pair (targets not starting with a
  sentinel) is joined. `paradigm_id`, if given, must lead the inputs and is dropped.

  Raises:
    ValueError: if the inputs and targets do not fit together.
  """
  inputs, targets = np.asarray(inputs), np.asarray(targets)
  sentinel_ids = _sentinel_array(sentinel_ids)
  if paradigm_id is not None:
    if not len(inputs) or inputs[0] != paradigm_id:
      raise ValueError(f'inputs should start with paradigm id {paradigm_id}, got '
                       f'{inputs[:1].tolist()}')
    inputs = inputs[1:]
  is_sentinel = _is_sentinel(targets, sentinel_ids)
  if not len(targets) or not is_sentinel[0]:
    if _is_sentinel(inputs, sentinel_ids).any() or is_sentinel.any():
      raise ValueError('targets do not start with a sentinel but the example holds sentinels')
    return np.concatenate([inputs, targets])
  cuts = np.flatnonzero(is_sentinel)
  ends = [*cuts[1:], len(targets)]
  order = targets[cuts].tolist()
  where = np.flatnonzero(_is_sentinel(inputs, sentinel_ids))
  used = len(where)
  # Sentinels in the inputs must open the targets in the same order; any further sentinel of
  # the targets (a one-token example's) must stand for an empty span.
  if (len(set(order)) != len(order) or order[:used] != inputs[where].tolist()
      or any(e > c + 1 for c, e in zip(cuts[used:], ends[used:]))):
    raise ValueError(f'sentinels of the inputs {inputs[where].tolist()} and of the targets '
                     f'{order} do not match')
  # Gather from inputs + targets: input token i itself, or for the k-th sentinel the span
  # after sentinel k in the targets (a ragged arange over (start, count) pairs).
  starts, counts = np.arange(len(inputs)), np.ones(len(inputs), np.int64)
  starts[where] = len(inputs) + cuts[:used] + 1
  counts[where] = np.asarray(ends[:used], np.int64) - cuts[:used] - 1
  firsts = np.cumsum(counts) - counts
  index = np.repeat(starts - firsts, counts) + np.arange(int(counts.sum()))
  return np.concatenate([inputs, targets])[index].astype(inputs.dtype)


def corrupted_lengths(length: int, d: Denoiser) -> tuple[int, int]:
  """(inputs, targets) lengths of `corrupt` on `length` tokens, paradigm token included;
  for an S-denoiser the largest each can be."""
  extra = d.paradigm is not None
  if d.kind == 'S':
    lo, hi = _prefix_bounds(length, d.noise_density)
    return hi + extra, length - lo
  if length < 2:  # T5's guard leaves a single token unmasked: targets = one empty sentinel.
    return length + extra, 1
  noise, spans = _span_counts(length, d.noise_density, d.mean_span)
  return length - noise + spans + extra, noise + spans


def num_sentinels(length: int, d: Denoiser) -> int:
  """Sentinels that `corrupt` uses on `length` tokens (one per noise span; none for S)."""
  if d.kind == 'S':
    return 0
  return 1 if length < 2 else _span_counts(length, d.noise_density, d.mean_span)[1]


def fit_length(inputs_length: int, targets_length: int, d: Denoiser) -> int:
  """The most raw tokens whose corruption by `d` fits `inputs_length` and `targets_length`
  (paradigm token included; no EOS): what T5's `random_spans_helper` computes for chunking."""
  fits = [n for n in range(2, inputs_length + targets_length + 1)
          if all(a <= b for a, b in zip(corrupted_lengths(n, d), (inputs_length, targets_length)))]
  if not fits:
    raise ValueError(f'no length fits {d.name} into inputs {inputs_length}, targets '
                     f'{targets_length}')
  return max(fits)


# ---------------------------------------------------------------- mixtures
@dataclasses.dataclass(frozen=True)
class Mixture:
  """Denoisers and their sampling weights (normalised to sum to 1)."""
  denoisers: tuple[Denoiser, ...]
  weights: tuple[float, ...]

  def __post_init__(self):
    if not self.denoisers or len(self.denoisers) != len(self.weights):
      raise ValueError(f'need one weight per denoiser, got {len(self.denoisers)} denoisers and '
                       f'{len(self.weights)} weights')
    w = np.asarray(self.weights, np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f'weights must be non-negative with a positive sum, got {self.weights}')
    object.__setattr__(self, 'denoisers', tuple(self.denoisers))
    object.__setattr__(self, 'weights', tuple(float(x) for x in w / w.sum()))

  @property
  def paradigm_tokens(self) -> tuple[str, ...]:
    """The distinct paradigm tokens in use (add them to the tokenizer)."""
    return tuple(dict.fromkeys(d.paradigm for d in self.denoisers if d.paradigm is not None))

  def choose(self, rng: np.random.Generator) -> int:
    """The index of a denoiser drawn by weight."""
    i = int(np.searchsorted(np.cumsum(self.weights), rng.random(), side='right'))
    return min(i, len(self.denoisers) - 1)  # The sum may fall short of 1 by rounding.

  def sample(self, tokens, rng: np.random.Generator, *, sentinel_ids,
             paradigm_ids: Mapping[str, int] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(inputs, targets, denoiser index) of one example: a denoiser drawn by weight, then
    `corrupt`; `paradigm_ids` maps paradigm tokens to ids (None: no paradigm tokens)."""
    i = self.choose(rng)
    d = self.denoisers[i]
    paradigm_id = None
    if paradigm_ids is not None and d.paradigm is not None:
      if d.paradigm not in paradigm_ids:
        raise ValueError(f'no id for paradigm token {d.paradigm!r} of {d.name}; paradigm_ids '
                         f'has {sorted(paradigm_ids)}')
      paradigm_id = paradigm_ids[d.paradigm]
    return (*corrupt(tokens, d, rng, sentinel_ids=sentinel_ids, paradigm_id=paradigm_id), i)


def _ul2(paradigm_tokens=PARADIGM_TOKENS) -> tuple[Denoiser, ...]:
  spec = [('R', 0.15, 3), ('R', 0.15, 8), ('X', 0.5, 3), ('X', 0.5, 8), ('X', 0.15, 64),
          ('X', 0.5, 64)]
  return (*(denoiser(k, r, mu, paradigm_tokens=paradigm_tokens) for k, r, mu in spec),
          denoiser('S', paradigm_tokens=paradigm_tokens))


def _ul2r(paradigm_tokens=PARADIGM_TOKENS) -> tuple[Denoiser, ...]:
  spec = [('R', 0.15, 3), ('X', 0.15, 32), ('X', 0.5, 3)]
  return (*(denoiser(k, r, mu, paradigm_tokens=paradigm_tokens) for k, r, mu in spec),
          denoiser('S', paradigm_tokens=paradigm_tokens))


# UL2 (Table 1's seven denoisers): the paper's `ul2_objective` samples its tasks uniformly
# when no rates are given, so the preset does too (1/7 each); pass `weights` for another
# share, e.g. 20% S with R and X at 40% each. UL2R (U-PaLM section 3): 50% S, 25% R and 25% X
# split evenly between the two X-denoisers.
PRESETS = {
    'ul2': (_ul2, (1.0,) * 7),
    'ul2r': (_ul2r, (0.25, 0.125, 0.125, 0.5)),
}
UL2 = Mixture(_ul2(), PRESETS['ul2'][1])
UL2R = Mixture(_ul2r(), PRESETS['ul2r'][1])

_KEYS = {'kind', 'noise_density', 'mean_span', 'paradigm', 'name', 'weight'}


def make_mixture(spec: str | Mixture | Sequence[Mapping], *,
                 weights: Sequence[float] | None = None,
                 paradigm_tokens: Mapping[str, str | None] | None = None) -> Mixture:
  """A `Mixture` from a config: a preset name ('ul2', 'ul2r'), a `Mixture`, or a list of
  dicts with keys `kind`, `noise_density`, `mean_span`, and optionally `paradigm` (a token,
  or None for none), `name` and `weight` (default 1).

  `weights` replaces the weights (one per denoiser); `paradigm_tokens` maps kinds to their
  paradigm tokens (default `PARADIGM_TOKENS`; a kind left out gets none) where a denoiser
  does not set its own.

  Example: `make_mixture([{'kind': 'R', 'noise_density': 0.15, 'mean_span': 3},
  {'kind': 'S', 'weight': 2}], paradigm_tokens={'R': '<r>', 'S': '<s>'})`.
  """
  tokens = PARADIGM_TOKENS if paradigm_tokens is None else paradigm_tokens
  if isinstance(spec, str):
    if spec.lower() not in PRESETS:
      raise ValueError(f'unknown UL2 mixture preset {spec!r}; known: {", ".join(PRESETS)}')
    build, default = PRESETS[spec.lower()]
    mix = Mixture(build(tokens), default)
  elif isinstance(spec, Mixture):
    mix = spec if paradigm_tokens is None else Mixture(
        tuple(dataclasses.replace(d, paradigm=tokens.get(d.kind)) for d in spec.denoisers),
        spec.weights)
  else:
    ds, ws = [], []
    for i, item in enumerate(spec):
      if not isinstance(item, Mapping) or 'kind' not in item or set(item) - _KEYS:
        raise ValueError(f'denoiser {i}: expected a dict with "kind" and keys among '
                         f'{sorted(_KEYS)}, got {item!r}')
      if item['kind'] not in KINDS:
        raise ValueError(f'denoiser {i}: unknown kind {item["kind"]!r}; expected one of {KINDS}')
      d = denoiser(item['kind'], item.get('noise_density'), item.get('mean_span'),
                   paradigm_tokens=tokens, name=item.get('name'))
      if 'paradigm' in item:
        d = dataclasses.replace(d, paradigm=item['paradigm'])
      ds.append(d)
      ws.append(item.get('weight', 1.0))
    mix = Mixture(tuple(ds), tuple(ws))
  if weights is not None:
    mix = Mixture(mix.denoisers, tuple(weights))
  return mix
