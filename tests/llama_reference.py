"""An independent LLaMA forward for the model tests: numpy, float64, GGUF tensor names and
[out, in] layout, Q/K rows in llama.cpp's permuted order with interleaved (GPT-J) rotary, and
key/value heads repeated for grouped-query attention. Plus random tiny `Llama` params."""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from peftjax.models.llama import Llama, LlamaConfig


def permute(w, heads):
  """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (HF rows -> GGUF rows)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def rope_interleaved(x, theta, pos):
  """GPT-J rotary of x [L, H, D] at positions `pos` [L]: dims (2i, 2i + 1) rotate together."""
  pos = np.asarray(pos, np.float64)
  d = x.shape[-1]
  angle = pos[:, None, None] * theta ** (-np.arange(0, d, 2) / d)
  even, odd = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
  out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
  return out


def logits(get, cfg: LlamaConfig, ids, eps: float, positions=None):
  """Logits [L, vocab] of one causal sequence at `positions` (default 0..L-1);
  `get(gguf_name)` returns a float64 array."""
  def rms(x, g):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

  n, h, hkv, d = len(ids), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  pos = np.arange(n) if positions is None else positions
  emb = get('token_embd.weight')
  x = emb[np.asarray(ids)]
  for i in range(cfg.num_layers):
    w = lambda name, i=i: get(f'blk.{i}.{name}.weight')
    a = rms(x, w('attn_norm'))
    q = rope_interleaved((a @ w('attn_q').T).reshape(n, h, d), cfg.rope_theta, pos)
    k = rope_interleaved((a @ w('attn_k').T).reshape(n, hkv, d), cfg.rope_theta, pos)
    v = (a @ w('attn_v').T).reshape(n, hkv, d)
    k, v = np.repeat(k, h // hkv, axis=1), np.repeat(v, h // hkv, axis=1)
    s = np.einsum('qhd,khd->hqk', q, k) / np.sqrt(d)
    s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    x = x + np.einsum('hqk,khd->qhd', p, v).reshape(n, h * d) @ w('attn_output').T
    a = rms(x, w('ffn_norm'))
    gate, up = a @ w('ffn_gate').T, a @ w('ffn_up').T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w('ffn_down').T
  x = rms(x, get('output_norm.weight'))
  return x @ (emb if cfg.tie_embeddings else get('output.weight')).T


_GGUF_NAMES = {
    'attn_norm': 'input_layernorm/scale', 'ffn_norm': 'post_attention_layernorm/scale',
    'attn_q': 'self_attn/q_proj/kernel', 'attn_k': 'self_attn/k_proj/kernel',
    'attn_v': 'self_attn/v_proj/kernel', 'attn_output': 'self_attn/o_proj/kernel',
    'ffn_gate': 'mlp/gate_proj/kernel', 'ffn_up': 'mlp/up_proj/kernel',
    'ffn_down': 'mlp/down_proj/kernel'}


def as_gguf(params, cfg: LlamaConfig) -> dict:
  """A Flax `Llama` tree in GGUF naming and layout (Q/K rows permuted), float64."""
  f = {'/'.join(k): np.asarray(v, np.float64)
       for k, v in flax.traverse_util.flatten_dict(params).items()}
  out = {'token_embd.weight': f['embed_tokens/embedding'], 'output_norm.weight': f['norm/scale']}
  if not cfg.tie_embeddings:
    out['output.weight'] = f['lm_head/kernel'].T
  for i in range(cfg.num_layers):
    for name, ours in _GGUF_NAMES.items():
      w = f[f'layers_{i}/{ours}']
      w = w.T if w.ndim == 2 else w
      heads = {'attn_q': cfg.num_heads, 'attn_k': cfg.num_kv_heads}.get(name)
      out[f'blk.{i}.{name}.weight'] = w if heads is None else permute(w, heads)
  return out


def random_params(cfg: LlamaConfig, seed: int, scale: float = 0.25):
  """Random params with non-trivial attention; norm scales near 1 (so a dropped norm shows)."""
  template = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  leaves, tree = jax.tree.flatten(template['params'])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  drawn = [1.0 + 0.3 * jax.random.normal(k, x.shape) if x.ndim == 1
           else scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(tree, drawn)
