"""A small Vision Transformer (Dosovitskiy et al., 2020, arXiv:2010.11929) for 28x28 images,
and its checkpoint pretrained by the project on Fashion-MNIST.

Pre-LayerNorm blocks built from the bundled BERT's layers (`bert.Dense`, `bert.SelfAttention`,
`bert.Dropout`, `bert.LayerNorm`, `bert.gelu`), so every linear layer computes structured
leaves (`LowRank`, `SparseDelta`) and the methods apply to it as they do to the text encoder.
Param paths (slash-joined):

  embeddings/patch/{kernel,bias}          (patch_size² · channels, hidden) patch projection
  embeddings/position                     (1, tokens, hidden) learned position embeddings
  embeddings/cls                          (1, 1, hidden), with pool='cls' only
  encoder/layer_{i}/attention_norm/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}
  encoder/layer_{i}/mlp_norm/{scale,bias}
  encoder/layer_{i}/{intermediate,output}/{kernel,bias}
  encoder/norm/{scale,bias}

`ViT(config)(images, train=)` maps images [B, H, W, C] to pooled features [B, hidden] (the
class token's final state, or the mean of the patch tokens'); `tokens=True` returns every
token's final (normalised) state instead, [B, tokens, hidden].

The pretrained checkpoint lives in `<asset cache>/vit/<name>/` (`config.json`,
`params.safetensors`, `head.safetensors`): `python -m experiments.pretrain_vit` makes it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.models import Model
from peftjax.models.bert import PARAM_AXES as BERT_PARAM_AXES
from peftjax.models.bert import Dense, Dropout, LayerNorm, SelfAttention, gelu
from peftjax.parallel.sharding import axes_from_table

PRETRAIN_COMMAND = 'python -m experiments.pretrain_vit'
PARAMS_FILE, HEAD_FILE, CONFIG_FILE = 'params.safetensors', 'head.safetensors', 'config.json'
POOLS = ('mean', 'cls')

# The patch projection's input (pixels of a patch) and the leading axes of the position and
# class embeddings are never sharded; the blocks' params are named as in BERT.
PARAM_AXES = (
    (r'embeddings/patch/kernel$', (None, 'embed')),
    (r'embeddings/patch/bias$', ('embed',)),
    (r'embeddings/position$', (None, 'position', 'embed')),
    (r'embeddings/cls$', (None, None, 'embed')),
) + BERT_PARAM_AXES

_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape and regularisation hyper-parameters of a ViT (field names as `BertConfig`'s)."""
  image_size: int = 28
  channels: int = 1
  patch_size: int = 4
  hidden_size: int = 64
  num_layers: int = 6
  num_heads: int = 4
  intermediate_size: int = 128
  pool: str = 'mean'
  layer_norm_eps: float = 1e-6
  hidden_dropout: float = 0.0
  attention_dropout: float = 0.0

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not divisible by patch_size '
                       f'{self.patch_size}')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by '
                       f'num_heads {self.num_heads}')
    if self.pool not in POOLS:
      raise ValueError(f'pool {self.pool!r}; expected one of {POOLS}')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_tokens(self) -> int:
    return self.num_patches + (self.pool == 'cls')


def patches(images, patch_size: int):
  """Images [B, H, W, C] as rows of non-overlapping patches [B, H/p · W/p, p · p · C], in
  row-major patch order, each patch's pixels row-major with channels last."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class Embeddings(nn.Module):
  """Patch projection, the class token (pool='cls'), position embeddings and dropout."""
  config: ViTConfig

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    cfg = self.config
    x = Dense(cfg.hidden_size, name='patch')(patches(images, cfg.patch_size), train=train)
    if cfg.pool == 'cls':
      cls = self.param('cls', nn.initializers.zeros_init(), (1, 1, cfg.hidden_size))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[-1])),
                           x], axis=1)
    position = self.param('position', _INIT, (1, cfg.num_tokens, cfg.hidden_size))
    return Dropout(cfg.hidden_dropout)(x + position.astype(x.dtype), train=train)


class Block(nn.Module):
  """One pre-LayerNorm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x, train: bool = False):
    cfg = self.config
    drop = Dropout(cfg.hidden_dropout)
    h = LayerNorm(epsilon=cfg.layer_norm_eps, name='attention_norm')(x)
    everywhere = jnp.ones(x.shape[:2], jnp.int32)  # no padding among image tokens
    x = x + drop(SelfAttention(cfg, name='attention')(h, everywhere, train=train), train=train)
    h = LayerNorm(epsilon=cfg.layer_norm_eps, name='mlp_norm')(x)
    h = gelu(Dense(cfg.intermediate_size, name='intermediate')(h, train=train))
    return x + drop(Dense(cfg.hidden_size, name='output')(h, train=train), train=train)


class Encoder(nn.Module):
  """`num_layers` blocks named `layer_{i}` (rematerialised with `remat`) and a final norm."""
  config: ViTConfig
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    for i in range(self.config.num_layers):
      x = block(self.config, name=f'layer_{i}')(x, train)
    return LayerNorm(epsilon=self.config.layer_norm_eps, name='norm')(x)


class ViT(nn.Module):
  """Vision Transformer: images [B, H, W, C] -> pooled features [B, hidden] (or, with
  `tokens=True`, token states [B, tokens, hidden]). Dropout is active only with
  `train=True` (a 'dropout' rng); `remat` recomputes each block in the backward pass."""
  config: ViTConfig
  remat: bool = False

  logical_axes = staticmethod(axes_from_table(PARAM_AXES))

  @nn.compact
  def __call__(self, images, *, train: bool = False, tokens: bool = False):
    cfg = self.config
    expected = (cfg.image_size, cfg.image_size, cfg.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f'ViT expects images [batch, {", ".join(map(str, expected))}], got '
                       f'shape {tuple(images.shape)}')
    x = Embeddings(cfg, name='embeddings')(images, train=train)
    x = Encoder(cfg, self.remat, name='encoder')(x, train=train)
    if tokens:
      return x
    return x[:, 0] if cfg.pool == 'cls' else jnp.mean(x, axis=1)


def _blank_images(config: ViTConfig):
  return jnp.zeros((1, config.image_size, config.image_size, config.channels), jnp.float32)


def init(config: ViTConfig, seed: int = 0, *, remat: bool = False) -> Model:
  """A randomly initialised ViT of `config`'s sizes."""
  module = ViT(config, remat)
  params = jax.jit(module.init)(jax.random.key(seed), _blank_images(config))['params']
  return Model(module, params, f'random-vit-seed{seed}', module.logical_axes)


def from_config(config, seed: int = 0) -> Model:
  """`models.build` for `name='vit'`: the pretrained checkpoint `config.checkpoint` (e.g.
  'fashion_mnist'), or with no checkpoint a random ViT of the config's `ViTConfig` fields."""
  remat = bool(config.get('remat', False))
  sizes = {k: v for k, v in config.items() if k not in ('name', 'remat', 'init', 'checkpoint')}
  if config.get('checkpoint'):
    if sizes:
      raise ValueError(f'model.checkpoint={config.checkpoint!r} fixes the ViT\'s sizes; got '
                       f'sizes as well: {sorted(sizes)}')
    return load_pretrained(config.checkpoint, remat=remat)
  return init(ViTConfig(**sizes), seed, remat=remat)


def checkpoint_dir(name: str, cache=None) -> pathlib.Path:
  """Where the pretrained checkpoint `name` lives: `<asset cache>/vit/<name>`."""
  from peftjax.data import assets  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(cache) if cache is not None else assets.cache_dir()
  return root / 'vit' / name


def save_pretrained(directory, config: ViTConfig, params, head, info: dict) -> pathlib.Path:
  """Writes a checkpoint folder (atomically): the config and `info` (e.g. the training
  summary) in `config.json`, the params and the task head as safetensors."""
  from peftjax.io.files import atomic_dir  # pylint: disable=g-import-not-at-top
  from peftjax.io.params_file import save_params  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  with atomic_dir(directory) as tmp:
    save_params(tmp / PARAMS_FILE, params)
    save_params(tmp / HEAD_FILE, head)
    (tmp / CONFIG_FILE).write_text(json.dumps(
        {'vit': dataclasses.asdict(config), **info}, indent=2) + '\n')
  return directory


def read_info(directory) -> dict:
  """The `config.json` of a checkpoint folder; a clear error naming the pretraining command
  where there is none."""
  path = pathlib.Path(directory) / CONFIG_FILE
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f'no pretrained ViT checkpoint at {directory} ({CONFIG_FILE} '
                            f'missing); make it with: {PRETRAIN_COMMAND}') from None


def load_pretrained(name: str = 'fashion_mnist', *, cache=None, remat: bool = False,
                    with_head: bool = False):
  """The pretrained ViT `name` as a `Model` (its id names the checkpoint and the first 12
  hex digits of its params file's sha256); with `with_head`, also its task head."""
  from peftjax.io.params_file import load_params  # pylint: disable=g-import-not-at-top
  directory = checkpoint_dir(name, cache)
  info = read_info(directory)
  config = ViTConfig(**info['vit'])
  module = ViT(config, remat)
  like = jax.eval_shape(module.init, jax.random.key(0), _blank_images(config))['params']
  params = load_params(directory / PARAMS_FILE, like)
  digest = hashlib.sha256((directory / PARAMS_FILE).read_bytes()).hexdigest()[:12]
  model = Model(module, params, f'peftjax-vit-{name}-{digest}', module.logical_axes)
  if not with_head:
    return model
  width = config.hidden_size
  head_like = {'kernel': jax.ShapeDtypeStruct((width, info['num_classes']), jnp.float32),
               'bias': jax.ShapeDtypeStruct((info['num_classes'],), jnp.float32)}
  return model, load_params(directory / HEAD_FILE, head_like)
