"""Slash-joined parameter paths and pattern-based target selection."""
from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Mapping

import jax

from peftjax.core.bottleneck import Inserted
from peftjax.core.leaves import is_structured

SEP = '/'


class PatternError(ValueError):
  """A target pattern that matches no parameter path."""


def _key_name(key) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(key_path) -> str:
  return SEP.join(_key_name(k) for k in key_path)


def flatten(tree) -> dict[str, Any]:
  """`{'a/b/kernel': leaf}` for every leaf of `tree` (structured leaves and inserted modules,
  `bottleneck.Inserted` (a `Bottleneck`, prompts), count as one leaf).

  Example:
    >>> import peftjax as pj
    >>> pj.flatten({'encoder': {'query': {'kernel': 1, 'bias': 2}}})
    {'encoder/query/bias': 2, 'encoder/query/kernel': 1}
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
  return {path_str(kp): leaf for kp, leaf in flat}


def _is_leaf(x) -> bool:
  return is_structured(x) or isinstance(x, Inserted)


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of `flatten` for trees of nested dicts.

  Example:
    >>> import peftjax as pj
    >>> pj.unflatten({'encoder/query/kernel': 1})
    {'encoder': {'query': {'kernel': 1}}}
  """
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    *parents, name = path.split(SEP)
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = leaf
  return tree


def select(paths: Iterable[str], patterns, *, what: str = 'parameter') -> list[str]:
  """Paths in which any regex of `patterns` is found (`re.search`), in input order.

  Args:
    paths: slash paths (e.g. the keys of `flatten(params)`).
    patterns: a regex or a sequence of them, e.g. `'attention/(query|value)/kernel'`.
    what: the noun the error message uses for a path.

  Returns:
    The matching paths.

  Raises:
    PatternError: a pattern matches no path; the message names the closest available paths.

  Example:
    >>> import peftjax as pj
    >>> pj.select(['layer_0/query/kernel', 'layer_0/key/kernel'], 'query')
    ['layer_0/query/kernel']
  """
  paths = list(paths)
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  chosen = set()
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise PatternError(f'target pattern {pattern!r} is not a valid regex: {e}') from None
    hits = {p for p in paths if regex.search(p)}
    if not hits:
      raise PatternError(no_match_message(pattern, paths, what))
    chosen |= hits
  return [p for p in paths if p in chosen]


def first_match(path: str, overrides: Mapping[str, Any] | None, default):
  """The value of the first regex in `overrides` found in `path`, else `default`."""
  for pattern, value in (overrides or {}).items():
    if re.search(pattern, path):
      return value
  return default


def check_overrides(paths: Iterable[str], overrides: Mapping[str, Any] | None, name: str):
  """Every key of a per-pattern override dict must match at least one of `paths`."""
  paths = list(paths)
  for pattern in overrides or {}:
    if not any(re.search(pattern, p) for p in paths):
      raise PatternError(f'{name}: ' + no_match_message(pattern, paths, 'target'))


def no_match_message(pattern: str, paths: list[str], what: str) -> str:
  near = difflib.get_close_matches(pattern, paths, n=5, cutoff=0.0)
  return (f'pattern {pattern!r} matches no {what} path among {len(paths)}; '
          f'closest: {", ".join(near) or "(none)"}')
