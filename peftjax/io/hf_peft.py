"""HF PEFT LoRA adapters: export peftjax's LoRA-shaped adapters of the bundled BERT and LLaMA
to PEFT's format, and import PEFT LoRA adapters of those models as `pj.lora` / `pj.rslora`.

PEFT's format is a folder with `adapter_config.json` (a `LoraConfig`: `peft_type: LORA`, `r`,
`lora_alpha`, `use_rslora`, `target_modules`, `rank_pattern`, `alpha_pattern`, ...) and
`adapter_model.safetensors`, whose tensors are named after the HF model's modules:
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], in PyTorch's
[out, in] layout; a linear layer y = x W^T runs as y = x W^T + scale * (x A^T) B^T with scale
lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`). peftjax's state holds a = A^T (in, r)
and b = B^T (r, out) for the kernel W^T (in, out), with the same scale.

Module names are those of the HF class the adapter loads on: `BertModel` (`task_type`
FEATURE_EXTRACTION, e.g. `encoder.layer.0.attention.self.query`) or, with a task head,
`BertForSequenceClassification` (SEQ_CLS: `bert.encoder.layer.0...`, the head as
`modules_to_save: ['classifier']`, tensors `base_model.model.classifier.{weight,bias}`);
`LlamaForCausalLM` (CAUSAL_LM: `model.layers.0.self_attn.q_proj`).

Methods that re-base the frozen tree (PiSSA, MiLoRA, SoMA, CorDA, LoRA-GA: frozen W_res =
W - s * A0 B0) are exported, as PEFT's own `path_initial_model_for_weight_conversion` does,
as a LoRA on the ORIGINAL weights: W_res + s A'B' = W + s (A'B' - A0 B0), the rank-2r LoRA
A = [A'; -A0], B = [B', B0] with the same scale. Such a file loads on the unmodified base
model; nothing else needs shipping.
"""
from __future__ import annotations

import collections
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from peftjax.core import calib
from peftjax.core import paths as P
from peftjax.core.adapter import Adapter, describe_targets
from peftjax.io.adapter_file import AdapterFileError
from peftjax.io.files import atomic_dir, read_json

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'
# Methods whose state is LoRA's {path: {'a', 'b'}} with a scale per target (`low_rank`).
EXPORTABLE = ('lora', 'lora_pro', 'pissa', 'milora', 'soma', 'corda', 'eva', 'lora_ga')
# `init_lora_weights` values that end as a plain LoRA on the unmodified base model.
PLAIN_INITS = (True, False, 'gaussian', 'orthogonal', 'eva')
# ... and those whose saved adapter runs on a residual base (unless PEFT converted it).
RESIDUAL_INITS = ('pissa', 'corda', 'olora', 'lora_ga')
# LoraConfig options whose non-default values change what the adapter computes.
_UNSUPPORTED = {
    'use_dora': (False, 'DoRA (use_dora) adds a magnitude vector'),
    'bias': ('none', "trained biases (bias != 'none')"),
    'lora_bias': (False, 'a bias on lora_B (lora_bias)'),
    'fan_in_fan_out': (False, 'Conv1D layers (fan_in_fan_out)'),
    'layer_replication': (None, 'layer replication'),
    'use_qalora': (False, 'QA-LoRA (use_qalora)'),
    'target_parameters': (None, 'LoRA on parameters (target_parameters)'),
    'trainable_token_indices': (None, 'trainable tokens (trainable_token_indices)'),
    'alora_invocation_tokens': (None, 'activated LoRA (alora_invocation_tokens)'),
    'megatron_config': (None, 'Megatron layers (megatron_config)'),
    'monteclora_config': (None, 'MonteCLoRA (monteclora_config)'),
    'velora_config': (None, 'VeLoRA (velora_config)'),
}


class HfPeftError(AdapterFileError):
  """An HF PEFT adapter that peftjax cannot export or import, or that does not fit the params
  (another base model, other shapes, missing files)."""


class UnsupportedAdapterError(HfPeftError):
  """An adapter type or option with no peftjax / PEFT LoRA counterpart (DoRA, LoHa, a trained
  bias, a method that is not LoRA-shaped, ...)."""


# ------------------------------------------------------------------------------ module names
def _family(params) -> str:
  if 'encoder' in params and 'embeddings' in params:
    return 'bert'
  if 'layers_0' in params and 'embed_tokens' in params:
    return 'llama'
  raise UnsupportedAdapterError(
      'HF PEFT files are supported for the bundled BERT and LLaMA models only; these params '
      f'have top-level keys {sorted(params)}')


def module_names(params) -> dict[str, str]:
  """`{kernel path: HF module name}` of every linear layer of a BERT (as `BertModel` names
  it) or LLaMA (as `LlamaForCausalLM` names it) param tree.

  Example: `module_names(bert_params)['encoder/layer_0/attention/query/kernel']` is
  `'encoder.layer.0.attention.self.query'`.
  """
  from peftjax.models import hf_llama, minilm  # pylint: disable=g-import-not-at-top
  family, out = _family(params), {}
  ours = {path: hf for hf, path in minilm.HF_LINEAR.items()}
  for path in P.flatten(params):
    if family == 'bert':
      m = re.fullmatch(r'encoder/layer_(\d+)/(.+)/kernel', path)
      if m and m[2] in ours:
        out[path] = f'encoder.layer.{m[1]}.{ours[m[2]]}'
    elif path.endswith('/kernel'):
      out[path] = hf_llama.hf_name(path).removesuffix('.weight')
  return out


def _layout(params, head) -> tuple[str, str, list[str]]:
  """(task_type, the HF class's prefix of our module names, its other linear modules)."""
  family = _family(params)
  if family == 'llama':
    if head:
      raise UnsupportedAdapterError('a LLaMA task head has no HF counterpart; export the '
                                    'adapter without it')
    return 'CAUSAL_LM', '', ([] if 'lm_head' in params else ['lm_head'])
  if head:
    if set(head) != {'kernel', 'bias'} or np.ndim(head['kernel']) != 2:
      raise UnsupportedAdapterError(
          f'only a linear head (kernel, bias) maps to BertForSequenceClassification\'s '
          f'classifier; this head has {sorted(P.flatten(head))} (export without the head)')
    return 'SEQ_CLS', 'bert.', ['bert.pooler.dense', 'classifier']
  return 'FEATURE_EXTRACTION', '', ['pooler.dense']


def _target_modules(chosen: list[str], universe: list[str]) -> list[str]:
  """The shortest dotted suffixes that select exactly `chosen` among `universe` with PEFT's
  list matching (a name equal to, or ending in '.' + suffix)."""
  chosen_set, out = set(chosen), []
  for name in chosen:
    parts = name.split('.')
    for k in range(1, len(parts) + 1):
      if parts[-k].isdigit():  # 'layer.1.x', not '1.x'
        continue
      suffix = '.'.join(parts[-k:])
      if all(m in chosen_set for m in universe if m == suffix or m.endswith('.' + suffix)):
        break
    if suffix not in out:
      out.append(suffix)
  return sorted(out)


# ------------------------------------------------------------------------------------ export
def _number(x: float):
  """A JSON number: an int where `x` is one (to 1e-9 relative), else a float."""
  rounded = round(x)
  return int(rounded) if abs(x - rounded) <= 1e-9 * max(1.0, abs(x)) else float(x)


def _initial_factors(adapter: Adapter, frozen, params) -> dict:
  """The state `init` starts from on `params` (re-based methods' A0, B0): the calibrated
  factors kept in `frozen`, or the deterministic factorisation of `params` again."""
  restored = calib.Restored(frozen=calib.calibrated_tensors(frozen))
  _, state0 = adapter.init(jax.random.key(0), params, calib=restored)
  return state0


def hf_tensors(adapter: Adapter, frozen, state, params) -> dict[str, tuple[np.ndarray,
                                                                            np.ndarray, float]]:
  """`{path: (A [r, in], B [out, r], scale)}` of a LoRA-shaped adapter as a LoRA on the
  original `params` (rank 2r for a re-based method: module docstring)."""
  method = adapter.config.get('method')
  if method not in EXPORTABLE or not all(isinstance(s, dict) and set(s) == {'a', 'b'}
                                         for s in state.values()):
    raise UnsupportedAdapterError(
        f'only LoRA-shaped methods ({", ".join(EXPORTABLE)}, rslora) export to HF PEFT; '
        f'this adapter is {method!r}')
  info = describe_targets(adapter, frozen, state)
  flat_frozen, flat_params = P.flatten(frozen), P.flatten(params)
  state0, out = None, {}
  for path, ab in state.items():
    if path not in flat_params:
      raise HfPeftError(f'{path} is adapted but is not in the base params')
    a, b = np.asarray(ab['a'], np.float32), np.asarray(ab['b'], np.float32)
    scale, base = float(info[path]['scale']), np.asarray(flat_params[path], np.float32)
    leaf = flat_frozen[path]
    if isinstance(leaf, calib.CalibratedResidual):
      a0, b0, residual = np.asarray(leaf.a), np.asarray(leaf.b), np.asarray(leaf.w)
    elif leaf is flat_params[path] or np.array_equal(np.asarray(leaf), base):
      out[path] = (a.T, b.T, scale)
      continue
    else:  # re-based on a deterministic factorisation of the base weight (PiSSA, MiLoRA)
      state0 = _initial_factors(adapter, frozen, params) if state0 is None else state0
      a0, b0, residual = np.asarray(state0[path]['a']), np.asarray(state0[path]['b']), leaf
    a0, b0 = a0.astype(np.float32), b0.astype(np.float32)
    gap = np.abs(np.asarray(residual, np.float64) - (base - scale * (a0.astype(np.float64)
                                                                     @ b0))).max()
    if gap > 1e-4 * max(1.0, float(np.abs(base).max())):
      raise HfPeftError(f'the frozen {path} is not base - scale * A0 @ B0 (off by {gap:.3g}): '
                        'pass the base params the adapter was initialised on')
    out[path] = (np.concatenate([a, -a0], 1).T, np.concatenate([b, b0], 0).T, scale)
  return out


def export_adapter(directory, adapter: Adapter, frozen, state, params, *, head=None,
                   base_model: str | None = None) -> pathlib.Path:
  """Writes a LoRA-shaped adapter of a BERT or LLaMA as an HF PEFT LoRA adapter (atomically).

  Args:
    directory: the folder to write (replaced as a whole; nothing is left on failure).
    adapter, frozen, state: the adapter, e.g. from `pj.load_adapter`.
    params: the original base params (a re-based method is exported on these).
    head: a sentence task's linear head {'kernel', 'bias'}: saved as `modules_to_save`
      ['classifier'] of `BertForSequenceClassification` (task_type SEQ_CLS).
    base_model: `base_model_name_or_path`.

  Returns:
    The path of `adapter_model.safetensors`.

  Raises:
    UnsupportedAdapterError: a method that is not LoRA-shaped, an embedding target, a model
      other than BERT / LLaMA, a head without an HF counterpart.
    HfPeftError: an adapter that does not fit `params`.

  Example:
    adapter, frozen, state, head, meta = pj.load_adapter('runs/x/adapter', params)
    export_adapter('hf/x', adapter, frozen, state, params, head=head,
                   base_model=meta['base_model'])
  """
  task_type, prefix, others = _layout(params, head)
  names = module_names(params)
  tensors_by_path = hf_tensors(adapter, frozen, state, params)
  rslora = bool(adapter.config.get('rslora', False))
  modules, tensors = {}, {}
  for path, (a, b, scale) in tensors_by_path.items():
    if path not in names:
      raise UnsupportedAdapterError(f'{path} is not a linear layer of the HF model (PEFT LoRA '
                                    'on embeddings and norms is not exported)')
    name, r = names[path], a.shape[0]  # patterns match with any prefix: `(.*\.)?name$`
    modules[name] = (r, scale * (math.sqrt(r) if rslora else r))
    tensors[f'{PREFIX}{prefix}{name}.lora_A.weight'] = np.ascontiguousarray(a, np.float32)
    tensors[f'{PREFIX}{prefix}{name}.lora_B.weight'] = np.ascontiguousarray(b, np.float32)
  if not modules:
    raise HfPeftError('the adapter adapts no parameter')
  if head:
    tensors[f'{PREFIX}classifier.weight'] = np.ascontiguousarray(
        np.asarray(head['kernel'], np.float32).T)
    tensors[f'{PREFIX}classifier.bias'] = np.asarray(head['bias'], np.float32)
  rank = collections.Counter(r for r, _ in modules.values()).most_common(1)[0][0]
  alpha = collections.Counter(_number(al) for _, al in modules.values()).most_common(1)[0][0]
  universe = [prefix + n for n in names.values()] + others
  config = {
      'peft_type': 'LORA', 'task_type': task_type, 'base_model_name_or_path': base_model,
      'r': rank, 'lora_alpha': alpha, 'use_rslora': rslora,
      'target_modules': _target_modules([prefix + n for n in modules], universe),
      'rank_pattern': {n: r for n, (r, _) in modules.items() if r != rank},
      'alpha_pattern': {n: _number(al) for n, (_, al) in modules.items()
                        if _number(al) != alpha},
      'lora_dropout': float(adapter.config.get('dropout', 0.0)),
      'modules_to_save': ['classifier'] if head else None,
      'bias': 'none', 'fan_in_fan_out': False, 'use_dora': False, 'init_lora_weights': True,
      'inference_mode': True, 'layers_to_transform': None, 'layers_pattern': None,
      'exclude_modules': None, 'revision': None,
  }
  directory = pathlib.Path(directory)
  with atomic_dir(directory) as tmp:
    safetensors.numpy.save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={'format': 'pt'})
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + '\n')
  return directory / WEIGHTS_FILE


# ------------------------------------------------------------------------------------ import
def is_hf_adapter(directory) -> bool:
  """Whether `directory` holds an HF PEFT adapter (an `adapter_config.json` with `peft_type`)."""
  try:
    return 'peft_type' in json.loads((pathlib.Path(directory) / CONFIG_FILE).read_text())
  except (OSError, ValueError):
    return False


def read_config(directory) -> dict:
  """The `adapter_config.json` of an HF PEFT LoRA adapter whose options peftjax computes.

  Raises:
    HfPeftError: no or a malformed config.
    UnsupportedAdapterError: another PEFT type (LoHa, LoKr, IA3, ...) or a LoRA option that
      changes the computation (DoRA, biases, layer replication, ...).
  """
  path = pathlib.Path(directory) / CONFIG_FILE
  config = read_json(path, HfPeftError,
                     f'no HF PEFT adapter at {directory}: {CONFIG_FILE} is missing')
  if not isinstance(config, dict) or 'peft_type' not in config:
    raise HfPeftError(f'{path} is not an HF PEFT config (no peft_type)')
  if config['peft_type'] != 'LORA':
    raise UnsupportedAdapterError(f'{path}: peft_type {config["peft_type"]!r} is not supported; '
                                  'only LORA adapters import')
  for key, (default, what) in _UNSUPPORTED.items():
    if config.get(key, default) not in (default, [], {}):
      raise UnsupportedAdapterError(f'{path}: {what} is not supported ({key}='
                                    f'{config[key]!r})')
  init = config.get('init_lora_weights', True)
  if init not in PLAIN_INITS and not str(init).startswith(RESIDUAL_INITS):
    raise UnsupportedAdapterError(f'{path}: init_lora_weights={init!r} does not end as a plain '
                                  'LoRA on the base model')
  return config


def _pattern_value(patterns: dict, name: str, default):
  """PEFT's `get_pattern_key`: the value of the first key matching `(.*\\.)?(key)$`."""
  for key, value in (patterns or {}).items():
    if re.match(rf'(.*\.)?({key})$', name):
      return value
  return default


def _targeted(config: dict, name: str) -> bool:
  """Whether PEFT's `target_modules` / `exclude_modules` select module `name`."""
  def listed(spec):
    if isinstance(spec, str):
      return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith('.' + t) for t in spec or ())
  if config.get('exclude_modules') and listed(config['exclude_modules']):
    return False
  targets = config.get('target_modules')
  if targets == 'all-linear':
    return not name.endswith(('lm_head', 'classifier'))  # PEFT leaves the output layer out
  layers = config.get('layers_to_transform')  # PEFT applies it to lists of names only
  if layers is not None and not isinstance(targets, str) and listed(targets):
    m = re.match(r'.*?\.[^.]*\.(\d+)\.', name)
    return m is not None and int(m[1]) in ([layers] if isinstance(layers, int) else layers)
  return listed(targets)


def _read_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  path = directory / WEIGHTS_FILE
  if not path.exists():
    other = ' (adapter_model.bin: save it with safe_serialization=True)' if (
        directory / 'adapter_model.bin').exists() else ''
    raise HfPeftError(f'no {WEIGHTS_FILE} in {directory}{other}')
  try:
    return safetensors.numpy.load_file(str(path))
  except Exception as e:  # safetensors raises several types for truncated/corrupt files
    raise HfPeftError(f'cannot read {path}: {e}') from None


def _our_path(name: str, by_name: dict[str, str]) -> str | None:
  """Our kernel path of a PEFT module name, allowing an HF class's prefix (`bert.`) or a bare
  LLaMA decoder's names (`layers.0...` for `model.layers.0...`)."""
  hits = [p for n, p in by_name.items() if name == n or name.endswith('.' + n)
          or n == 'model.' + name]
  return hits[0] if len(hits) == 1 else None


def _file_naming(factors: dict, by_name: dict[str, str]):
  """Our HF module name -> the name the file uses (with its class's prefix, if any)."""
  ours = {p: n for n, p in by_name.items()}
  for path, f in factors.items():
    if f['name'].endswith(ours[path]):
      prefix = f['name'][:-len(ours[path])]
      return lambda n: prefix + n
    return lambda n: n.removeprefix('model.')
  return lambda n: n


def import_adapter(directory, params, *, dtype=None):
  """Imports an HF PEFT LoRA adapter of a BERT or LLaMA as a peftjax `lora` (or rslora).

  Args:
    directory: a folder with `adapter_config.json` and `adapter_model.safetensors`.
    params: the base params it runs on (shapes and module names are checked).
    dtype: the state's dtype (default: each target weight's).

  Returns:
    `(adapter, frozen, state, head, config)` like `pj.load_adapter`: the adapter's targets are
      the adapted kernels' exact paths with their ranks and alphas; `head` is a
      `modules_to_save` classifier as a linear head {'kernel', 'bias'} (else None); `config` is
      the PEFT config.

  Raises:
    UnsupportedAdapterError: read_config's cases, LoRA on embeddings, modules_to_save other
      than `classifier`, an init that runs on a residual base (convert it to LoRA in PEFT).
    HfPeftError: missing files, modules this model lacks, shapes that do not fit.

  Example:
    adapter, frozen, state, head, _ = import_adapter('hf/x', params)
    logits = model.apply({'params': adapter.apply(frozen, state)}, ids, mask)
  """
  from peftjax import methods  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  config = read_config(directory)
  init = config.get('init_lora_weights', True)
  if init not in PLAIN_INITS:
    raise UnsupportedAdapterError(
        f'{directory}: init_lora_weights={init!r} adapters run on the residual base model '
        "PEFT made; save them converted to LoRA on the original base "
        '(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and import that')
  tensors = _read_tensors(directory)
  flat_params, by_name = P.flatten(params), {n: p for p, n in module_names(params).items()}
  factors, head, unknown = {}, {}, []
  for key, value in tensors.items():
    name = key.removeprefix(PREFIX)
    m = re.fullmatch(r'(.+)\.lora_([AB])\.weight', name)
    if m is None:
      if name in ('classifier.weight', 'classifier.bias') and (
          config.get('modules_to_save') or []) == ['classifier']:
        head[name.split('.')[1]] = value
        continue
      if 'lora_embedding' in name:
        raise UnsupportedAdapterError(f'{directory}: LoRA on embeddings ({key}) is not '
                                      'supported')
      unknown.append(key)
      continue
    path = _our_path(m[1], by_name)
    if path is None:
      unknown.append(key)
      continue
    factors.setdefault(path, {'name': m[1]})[m[2]] = value
  extra = set(config.get('modules_to_save') or []) - {'classifier'}
  if extra or unknown:
    raise HfPeftError(f'{directory} does not fit these params (another base model?): '
                      + (f'modules_to_save {sorted(extra)} have no peftjax counterpart; '
                         if extra else '')
                      + (f'{len(unknown)} tensors name modules this model lacks, e.g. '
                         f'{unknown[:3]}; its linear modules are e.g. {list(by_name)[:2]}'
                         if unknown else ''))
  as_named = _file_naming(factors, by_name)
  missing = [as_named(n) for n, p in by_name.items()
             if _targeted(config, as_named(n)) and p not in factors]
  missing += [f['name'] for f in factors.values() if set(f) != {'name', 'A', 'B'}]
  if missing or not factors:
    raise HfPeftError(f'{directory}: no lora_A / lora_B tensors for targeted modules '
                      f'{missing[:3] or "(none in the file)"}')
  rslora, rank, alpha = bool(config.get('use_rslora')), config['r'], config['lora_alpha']
  rank_pattern, alpha_pattern, state = {}, {}, {}
  for path, f in factors.items():
    a, b, w = f['A'], f['B'], flat_params[path]
    r = a.shape[0]
    if a.shape != (r, w.shape[0]) or b.shape != (w.shape[1], r):
      raise HfPeftError(f'{directory}: {f["name"]} has lora_A {a.shape} and lora_B {b.shape}; '
                        f'this model\'s {path} needs [r, {w.shape[0]}] and [{w.shape[1]}, r] '
                        '(another base model?)')
    configured = _pattern_value(config.get('rank_pattern'), f['name'], rank)
    if r != configured:
      raise HfPeftError(f'{directory}: {f["name"]} has rank {r} but the config gives '
                        f'{configured} (r / rank_pattern)')
    exact = f'^{re.escape(path)}$'
    if r != rank:
      rank_pattern[exact] = r
    module_alpha = _pattern_value(config.get('alpha_pattern'), f['name'], alpha)
    if module_alpha != alpha:
      alpha_pattern[exact] = module_alpha
    kind = dtype or w.dtype
    state[path] = {'a': jnp.asarray(a.T, kind), 'b': jnp.asarray(b.T, kind)}
  adapter = methods.lora([f'^{re.escape(p)}$' for p in factors], rank, alpha,
                         dropout=float(config.get('lora_dropout', 0.0)), rslora=rslora,
                         rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
  frozen, _ = adapter.init(jax.random.key(0), params)
  if head:
    if set(head) != {'weight', 'bias'}:
      raise HfPeftError(f'{directory}: the classifier needs weight and bias; found {sorted(head)}')
    head = {'kernel': jnp.asarray(head['weight'].T), 'bias': jnp.asarray(head['bias'])}
  return adapter, frozen, state, head or None, config


def load_any(directory, params):
  """`pj.load_adapter(directory, params)`, or `import_adapter` where `directory` holds an HF
  PEFT adapter: `(adapter, frozen, state, head, meta)` either way."""
  if is_hf_adapter(directory):
    return import_adapter(directory, params)
  from peftjax.io.adapter_file import load_adapter  # pylint: disable=g-import-not-at-top
  return load_adapter(directory, params)
