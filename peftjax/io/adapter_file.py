"""Adapter-only files: `adapter.safetensors` (the trainable state, and a task head if any)
plus `adapter_config.json` (method config, targets with their shapes, ranks and scales, base
model id). Loading checks the file against the param tree it is loaded into.

Data-initialised methods (CorDA, LoRA-GA) re-base the frozen tree on factors computed from
calibration data; their `calib.CalibratedResidual` leaves' initial factors are saved under
`frozen/` and handed back to `init` as `calib.Restored`, so loading needs no data. Sparse
methods' selected indices (`leaves.SparseDelta`) are saved there too, as `frozen/PATH/index`:
the first index and then the gaps between the sorted indices, in the smallest unsigned
integer type that holds them; `calib.Restored` receives them decoded.

A method with a `codec` (`Adapter.codec`, e.g. mask tuning's bit-packed masks) has its state
saved as `codec.encode(state)`; loading checks the file against the encoding of the state
`init` returns and decodes it.
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from peftjax import methods
from peftjax.core import calib
from peftjax.core import paths as P
from peftjax.core.adapter import Adapter, describe_targets
from peftjax.core.leaves import SparseDelta
from peftjax.io.files import atomic_dir, read_json
from peftjax.methods.sparse import index_dtype

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter.safetensors'
FORMAT = 'peftjax-adapter'


class AdapterFileError(ValueError):
  """An adapter file that is corrupt or does not fit the params it is loaded into."""


def save_adapter(directory, adapter: Adapter, frozen, state, *, head=None,
                 base_model: str | None = None) -> pathlib.Path:
  """Writes the adapter alone (atomically): `adapter.safetensors` and `adapter_config.json`.

  Args:
    directory: the adapter's folder (created if needed).
    adapter, frozen, state: a method and its (trained) state, as `adapter.init` gave them.
    head: the task's trainable params beside the adapter, saved with it.
    base_model: an id of the base model, recorded in the config.

  Returns:
    The path of `adapter.safetensors`.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, peftjax as pj
    >>> params = {'dense': {'kernel': jnp.ones((4, 4))}}
    >>> adapter = pj.lora('kernel', rank=2)
    >>> frozen, state = adapter.init(jax.random.key(0), params)
    >>> folder = tempfile.mkdtemp()
    >>> pj.save_adapter(folder, adapter, frozen, state).name
    'adapter.safetensors'
    >>> pj.load_adapter(folder, params)[4]['method']['method']
    'lora'
  """
  stored = adapter.codec.encode(state) if adapter.codec is not None else state
  tensors = {f'state/{k}': np.asarray(v) for k, v in P.flatten(stored).items()}
  tensors |= {f'head/{k}': np.asarray(v) for k, v in P.flatten(head or {}).items()}
  tensors |= {f'frozen/{k}': v for k, v in calib.calibrated_tensors(frozen).items()}
  tensors |= {f'frozen/{k}': v for k, v in _sparse_indices(frozen).items()}
  meta = {
      'format': FORMAT, 'version': 1, 'method': adapter.config, 'base_model': base_model,
      'targets': describe_targets(adapter, frozen, state),
      'tensors': {k: {'shape': list(v.shape), 'dtype': str(v.dtype)} for k, v in tensors.items()},
  }
  directory = pathlib.Path(directory)
  with atomic_dir(directory) as tmp:
    safetensors.numpy.save_file(tensors, str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=_jsonable))
  return directory / WEIGHTS_FILE


def read_adapter_config(directory) -> dict:
  path = pathlib.Path(directory) / CONFIG_FILE
  meta = read_json(path, AdapterFileError, f'no adapter at {directory}: {CONFIG_FILE} is missing')
  if meta.get('format') != FORMAT:
    raise AdapterFileError(f'{path}: expected format {FORMAT!r}, found {meta.get("format")!r}')
  return meta


def _read_tensors(directory: pathlib.Path) -> dict:
  try:
    return safetensors.numpy.load_file(str(directory / WEIGHTS_FILE))
  except Exception as e:  # safetensors raises several types for truncated/corrupt files
    raise AdapterFileError(f'cannot read {directory / WEIGHTS_FILE}: {e}') from None


def load_head(directory, like) -> dict:
  """The task head saved with the adapter in `directory`, checked against `like`'s shapes.

  Args:
    directory: an adapter folder written by `save_adapter`.
    like: a head of the task's shapes (e.g. `task.init_head(rng)`).

  Returns:
    The saved head, with `like`'s structure.

  Raises:
    AdapterFileError: no adapter there, or a head of other params or shapes.
  """
  directory = pathlib.Path(directory)
  read_adapter_config(directory)
  tensors = _read_tensors(directory)
  found = {k[len('head/'):]: v for k, v in tensors.items() if k.startswith('head/')}
  return fitting_head(found, like, directory)


def fitting_head(found: dict, like, directory) -> dict:
  """`found` (`{path: array}`, a head saved with the adapter in `directory`) with `like`'s
  structure; raises `AdapterFileError` where its params or shapes differ from `like`'s."""
  expected = {k: tuple(v.shape) for k, v in P.flatten(like).items()}
  got = {k: tuple(v.shape) for k, v in found.items()}
  if got != expected:
    other_kind = (f' (a head of another kind: params {sorted(set(got) - set(expected))} only '
                  f'in the file, {sorted(set(expected) - set(got))} only in this task\'s head; '
                  'check head.kind)') if got and set(got) != set(expected) else ''
    raise AdapterFileError(f'the head saved in {directory} does not fit this task: expected '
                           f'{expected}, found {got or "no head"}{other_kind}')
  return P.unflatten({k: jnp.asarray(v) for k, v in found.items()})


def load_adapter(directory, params, *, rng=None):
  """Loads an adapter for `params`: the method rebuilt from its config, and its state.

  Args:
    directory: an adapter folder written by `save_adapter`.
    params: the base model's params (the method's `init` runs on them again).
    rng: the key of that `init` (state is read from the file, so it rarely matters).

  Returns:
    `(adapter, frozen, state, head, meta)`: `meta` is the parsed `adapter_config.json`
      (method config, targets with shapes, base model id).

  Raises:
    AdapterFileError: no adapter there, a corrupt file, a method it cannot rebuild, or params
      of other shapes than those it was trained for.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, peftjax as pj
    >>> params = {'dense': {'kernel': jnp.ones((4, 4))}}
    >>> adapter = pj.lora('kernel', rank=2)
    >>> frozen, state = adapter.init(jax.random.key(0), params)
    >>> folder = tempfile.mkdtemp()
    >>> _ = pj.save_adapter(folder, adapter, frozen, state)
    >>> adapter, frozen, state, head, meta = pj.load_adapter(folder, params)
    >>> list(state)
    ['dense/kernel']
  """
  directory = pathlib.Path(directory)
  meta = read_adapter_config(directory)
  flat_params = P.flatten(params)
  for target, info in meta['targets'].items():
    path = target.split(P.SEP, 1)[1] if meta['method']['method'] == 'chain' else target
    if path in flat_params and list(flat_params[path].shape) != info['shape']:
      raise AdapterFileError(
          f'adapter target {path} was trained for shape {tuple(info["shape"])} but the params '
          f'hold {tuple(flat_params[path].shape)} (base model of the file: {meta["base_model"]})')
  tensors = _read_tensors(directory)
  try:
    adapter = methods.from_config(meta['method'])
  except (ValueError, TypeError) as e:  # an unknown method or arguments it does not take
    raise AdapterFileError(f'{directory / CONFIG_FILE}: cannot rebuild the method: {e}') from None
  rng = jax.random.key(0) if rng is None else rng
  found = {k[len('state/'):]: v for k, v in tensors.items() if k.startswith('state/')}
  saved = calib.Restored(found, {k[len('frozen/'):]: _decoded(k, v) for k, v in tensors.items()
                                 if k.startswith('frozen/')})
  try:
    frozen, template = adapter.init(rng, params, calib=saved)
  except ValueError as e:  # e.g. a target pattern that matches nothing in these params
    raise AdapterFileError(f'adapter at {directory} does not fit these params: {e}') from None
  codec = adapter.codec
  encoded = codec.encode(template) if codec is not None else template
  expected = P.flatten(encoded)
  problems = mismatches(expected, found)
  if problems:
    raise AdapterFileError(f'adapter at {directory} does not fit these params: {problems}')
  leaves, treedef = jax.tree.flatten(encoded)
  keys = list(expected)
  state = jax.tree.unflatten(treedef, [jnp.asarray(found[k], l.dtype)
                                      for k, l in zip(keys, leaves)])
  if codec is not None:
    state = codec.decode(state, template)
  head = P.unflatten({k[len('head/'):]: jnp.asarray(v) for k, v in tensors.items()
                      if k.startswith('head/')})
  return adapter, frozen, state, head or None, meta


def _sparse_indices(frozen) -> dict[str, np.ndarray]:
  """`{'path/index': gaps}` of every `SparseDelta` in `frozen` (module docstring)."""
  out = {}
  for path, leaf in P.flatten(frozen).items():
    if isinstance(leaf, SparseDelta):
      gaps = np.diff(np.asarray(leaf.index, np.int64), prepend=0)
      if gaps.size and (gaps.min() < 0 or (gaps[1:] == 0).any()):
        raise ValueError(f'the selected indices of {path} are not sorted and unique')
      out[f'{path}{P.SEP}index'] = gaps.astype(index_dtype(int(gaps.max(initial=0))))
  return out


def _decoded(key: str, tensor: np.ndarray) -> np.ndarray:
  """A saved frozen tensor as `init` takes it: sparse indices summed back from their gaps."""
  return np.cumsum(tensor, dtype=np.int64) if key.endswith(f'{P.SEP}index') else tensor


def mismatches(expected: dict, found: dict) -> str:
  """The first few differences in paths and shapes between two flat trees ('' if none)."""
  problems = [f'{k}: expected {tuple(v.shape)}, found '
              f'{tuple(found[k].shape) if k in found else "nothing"}'
              for k, v in expected.items() if k not in found or found[k].shape != v.shape]
  problems += [f'{k}: unexpected in file' for k in found if k not in expected]
  return '; '.join(problems[:5]) + (' ...' if len(problems) > 5 else '')


def _jsonable(x):
  if isinstance(x, (np.generic,)):
    return x.item()
  raise TypeError(f'not JSON serialisable: {type(x).__name__}')
