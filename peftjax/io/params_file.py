"""Whole param trees as one safetensors file (slash-joined paths): a stage's merged result
that the next stage starts from (`model.init`)."""
from __future__ import annotations

import pathlib

import jax
import numpy as np
import safetensors.numpy

from peftjax.core import paths as P
from peftjax.core.leaves import materialize
from peftjax.io.adapter_file import mismatches
from peftjax.io.files import atomic_write_bytes


class ParamsFileError(ValueError):
  """A params file that is missing, corrupt or does not fit the model it is loaded into."""


def save_params(path, params) -> pathlib.Path:
  """Writes `params` (structured leaves materialised) to `path` in one rename."""
  flat = P.flatten(jax.device_get(materialize(params)))
  atomic_write_bytes(path, safetensors.numpy.save({k: np.asarray(v) for k, v in flat.items()}))
  return pathlib.Path(path)


def load_params(path, like):
  """The tree saved at `path`, checked against `like` (same paths, shapes; cast to its
  dtypes)."""
  try:
    found = safetensors.numpy.load_file(str(path))
  except FileNotFoundError:
    raise ParamsFileError(f'no params file at {path}') from None
  except Exception as e:  # safetensors raises several types for truncated/corrupt files
    raise ParamsFileError(f'cannot read params file {path}: {e}') from None
  expected = P.flatten(like)
  problems = mismatches(expected, found)
  if problems:
    raise ParamsFileError(f'params file {path} does not fit this model: {problems}')
  return P.unflatten({k: found[k].astype(v.dtype) for k, v in expected.items()})
