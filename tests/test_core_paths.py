"""Slash paths and pattern selection: round trips, regex search semantics, clear errors."""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from peftjax.core import paths as P
from peftjax.core.leaves import LowRank

PATHS = ['embeddings/word/embedding',
         'encoder/layer_0/attention/query/kernel', 'encoder/layer_0/attention/query/bias',
         'encoder/layer_0/attention/value/kernel', 'encoder/layer_0/intermediate/kernel',
         'encoder/layer_1/attention/query/kernel', 'encoder/layer_1/attention/value/kernel',
         'encoder/layer_1/output_norm/scale']


def random_tree(seed):
  """A nested dict with the leaves of `PATHS` holding random values."""
  keys = jax.random.split(jax.random.key(seed), len(PATHS))
  return P.unflatten({p: jax.random.normal(k, (4, 3) if p.endswith('kernel') else (3,))
                      for p, k in zip(PATHS, keys)})


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_flatten_unflatten_round_trip(seed):
  tree = random_tree(seed)
  flat = P.flatten(tree)
  assert sorted(flat) == sorted(PATHS)
  assert flat['encoder/layer_1/attention/value/kernel'] is (
      tree['encoder']['layer_1']['attention']['value']['kernel'])
  back = P.unflatten(flat)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  jax.tree.map(np.testing.assert_array_equal, back, tree)
  assert P.flatten(back).keys() == flat.keys()


def test_flatten_keeps_a_structured_leaf_whole():
  k = jax.random.split(jax.random.key(3), 3)
  leaf = LowRank(jax.random.normal(k[0], (4, 3)), jax.random.normal(k[1], (4, 2)),
                 jax.random.normal(k[2], (2, 3)), 0.5)
  flat = P.flatten({'q': {'kernel': leaf, 'bias': k[0]}})
  assert sorted(flat) == ['q/bias', 'q/kernel'] and flat['q/kernel'] is leaf


@pytest.mark.parametrize('patterns', [
    'query', ['query', 'value/kernel'], 'layer_1/.*kernel$', ['^encoder/layer_0', 'embedding'],
    r'(query|value)/kernel', 'kernel|scale'])
def test_select_is_regex_search_in_input_order(patterns):
  pats = [patterns] if isinstance(patterns, str) else patterns
  expected = [p for p in PATHS if any(re.search(x, p) for x in pats)]
  got = P.select(PATHS, patterns)
  assert got == expected
  assert len(set(got)) == len(got)
  assert P.select(list(reversed(PATHS)), patterns) == list(reversed(expected))


def test_select_is_not_anchored_but_anchors_work():
  assert P.select(PATHS, 'query/kernel') == ['encoder/layer_0/attention/query/kernel',
                                             'encoder/layer_1/attention/query/kernel']
  with pytest.raises(P.PatternError):
    P.select(PATHS, '^query/kernel')


def test_unmatched_pattern_names_it_and_the_closest_paths():
  with pytest.raises(P.PatternError) as info:
    P.select(PATHS, ['query', 'encoder/layer_0/atention/qury/kernel'])
  msg = str(info.value)
  assert isinstance(info.value, ValueError)
  assert "'encoder/layer_0/atention/qury/kernel'" in msg
  assert f'among {len(PATHS)}' in msg
  closest = msg.split('closest: ')[1].split(', ')
  assert closest[0] == 'encoder/layer_0/attention/query/kernel'
  assert 1 <= len(closest) <= 5 and set(closest) <= set(PATHS)


def test_unmatched_message_names_what_was_searched():
  with pytest.raises(P.PatternError, match="'nothing' matches no 2-D parameter path among 8"):
    P.select(PATHS, 'nothing', what='2-D parameter')
  with pytest.raises(P.PatternError, match=r'closest: \(none\)'):
    P.select([], 'anything')


@pytest.mark.parametrize('bad', ['(query', '[a-', '*kernel'])
def test_invalid_regex_is_a_pattern_error(bad):
  with pytest.raises(P.PatternError, match=re.escape(repr(bad)) + ' is not a valid regex'):
    P.select(PATHS, ['query', bad])


def test_first_match_takes_the_first_pattern_in_order():
  path = 'encoder/layer_1/attention/query/kernel'
  assert P.first_match(path, {'layer_1': 1, 'query': 2}, 9) == 1
  assert P.first_match(path, {'query': 2, 'layer_1': 1}, 9) == 2
  assert P.first_match(path, {'layer_0': 1, 'que.y': 3}, 9) == 3
  assert P.first_match(path, {'^query': 1, 'value': 2}, 9) == 9
  assert P.first_match(path, None, 7) == 7 and P.first_match(path, {}, 7) == 7


def test_check_overrides_needs_every_key_to_match_a_target():
  targets = [p for p in PATHS if p.endswith('kernel')]
  P.check_overrides(targets, {'layer_1': 2, 'intermediate': 4}, 'rank_pattern')
  P.check_overrides(targets, None, 'rank_pattern')
  with pytest.raises(P.PatternError, match=r"alpha_pattern: pattern 'output_norm' matches no "
                                           r'target path among 5'):
    P.check_overrides(targets, {'layer_1': 2, 'output_norm': 1}, 'alpha_pattern')
