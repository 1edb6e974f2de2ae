"""Writes `t5_reference.npz`: tiny random T5 models and their outputs from an independent
implementation, HF transformers `T5ForConditionalGeneration` (fp32, eval mode, CPU).

Two variants: T5.1.1 (gated-GELU, untied `lm_head`, 32 buckets up to distance 128) and the
original T5 (ReLU, logits from the tied embedding scaled by d_model**-0.5, 8 buckets up to
16, so that short rows reach the log-spaced and saturated buckets of both directions).
Norm scales and bias tables are drawn away from their inits so that each one matters. Rows
are padded (attention masks with zeros). Generated with torch 2.13.0+cpu and transformers
5.24.0 (recorded in the npz as `versions`) in a separate venv, never imported by peftjax:

  python3 -m venv /tmp/t5ref
  /tmp/t5ref/bin/pip install torch==2.13.0 transformers
  /tmp/t5ref/bin/python tests/golden/make_t5_reference.py
"""
from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers

COMMON = dict(vocab_size=48, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2,
              num_heads=4, dropout_rate=0.0, layer_norm_epsilon=1e-6, decoder_start_token_id=0,
              pad_token_id=0, eos_token_id=1)
VARIANTS = {
    't5_1_1': dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128),
    't5': dict(feed_forward_proj='relu', tie_word_embeddings=True,
               relative_attention_num_buckets=8, relative_attention_max_distance=16),
}
ENCODER_LENGTHS, DECODER_LENGTHS = (24, 17, 9), (12, 12, 5)
GENERATE = 8


def _batch(rng, lengths, width):
  ids = np.zeros((len(lengths), width), np.int64)
  for row, n in enumerate(lengths):
    ids[row, :n] = rng.integers(2, COMMON['vocab_size'], n)
  return ids, (ids > 0).astype(np.int64)


def variant(name: str, rng) -> dict:
  config = transformers.T5Config(**COMMON, **VARIANTS[name])
  model = transformers.T5ForConditionalGeneration(config).eval()
  if not VARIANTS[name]['tie_word_embeddings']:  # a separate lm_head (T5.1.1)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(48, 16) * 16 ** -0.5)
  with torch.no_grad():
    for key, p in model.named_parameters():
      if 'layer_norm' in key:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif 'relative_attention_bias' in key:
        p.copy_(torch.randn_like(p))
  enc, enc_mask = _batch(rng, ENCODER_LENGTHS, max(ENCODER_LENGTHS))
  dec, dec_mask = _batch(rng, DECODER_LENGTHS, max(DECODER_LENGTHS))
  t = torch.from_numpy
  with torch.no_grad():
    out = model(input_ids=t(enc), attention_mask=t(enc_mask), decoder_input_ids=t(dec),
                decoder_attention_mask=t(dec_mask))
    generated = model.generate(input_ids=t(enc), attention_mask=t(enc_mask), do_sample=False,
                               num_beams=1, max_new_tokens=GENERATE, min_new_tokens=0)
  params = {f'{name}/hf/{k}': v.detach().numpy().astype(np.float32)
            for k, v in model.state_dict().items()
            if not (VARIANTS[name]['tie_word_embeddings'] and k == 'lm_head.weight')
            and not k.endswith('embed_tokens.weight')}
  return {**params,
          f'{name}/encoder_ids': enc.astype(np.int32),
          f'{name}/encoder_mask': enc_mask.astype(np.int32),
          f'{name}/decoder_ids': dec.astype(np.int32),
          f'{name}/decoder_mask': dec_mask.astype(np.int32),
          f'{name}/encoded': out.encoder_last_hidden_state.numpy().astype(np.float32),
          f'{name}/logits': out.logits.numpy().astype(np.float32),
          f'{name}/generated': generated.numpy().astype(np.int32)}


def main(out: pathlib.Path) -> None:
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  arrays = {}
  for name in VARIANTS:
    arrays.update(variant(name, rng))
  arrays['versions'] = np.array([f'torch=={torch.__version__}',
                                 f'transformers=={transformers.__version__}'])
  np.savez_compressed(out, **arrays)
  print(f'wrote {out} ({out.stat().st_size} bytes)')


if __name__ == '__main__':
  main(pathlib.Path(__file__).with_name('t5_reference.npz'))
