"""Writes `minilm_reference.npz`: all-MiniLM-L6-v2 outputs from an independent implementation.

Reference: HF transformers `BertModel` (eager attention, no pooler) in fp32 eval mode on CPU,
with the HF tokenizer from the same model directory (padding to longest, truncation 64).
Generated with torch 2.13.0+cpu and transformers 5.24.0 (recorded in the npz as `versions`)
in a separate venv, never imported by peftjax:

  python3 -m venv /work/refvenv
  /work/refvenv/bin/pip install torch==2.13.0 transformers
  /work/refvenv/bin/python tests/golden/make_minilm_reference.py MODEL_DIR

MODEL_DIR holds config.json, model.safetensors and the tokenizer files
(`peftjax.data.assets.asset_path('minilm')`, filled by
`python -m peftjax.data.assets fetch minilm`); the tokenizer is built from its tokenizer.json.
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import torch
import transformers

SENTENCES = [
    'A man is eating food.',
    'A man is eating a piece of bread.',
    'The girl is carrying a baby.',
    'A monkey is playing drums.',
    'Quantum chromodynamics describes the strong interaction between quarks.',
    'Hi!',
]


def main(model_dir: str, out: pathlib.Path) -> None:
  torch.manual_seed(0)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  model = transformers.BertModel.from_pretrained(
      model_dir, add_pooling_layer=False, attn_implementation='eager',
      torch_dtype=torch.float32)
  model.eval()
  batch = tokenizer(SENTENCES, padding='longest', truncation=True, max_length=64,
                    return_tensors='pt')
  with torch.no_grad():
    hidden = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'],
                   token_type_ids=batch['token_type_ids']).last_hidden_state
  mask = batch['attention_mask'].unsqueeze(-1).to(hidden.dtype)
  pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
  np.savez_compressed(
      out,
      sentences=np.array(SENTENCES),
      input_ids=batch['input_ids'].numpy().astype(np.int32),
      attention_mask=batch['attention_mask'].numpy().astype(np.int32),
      last_hidden_state=hidden.numpy().astype(np.float32),
      embeddings=pooled.numpy().astype(np.float32),
      versions=np.array([f'torch=={torch.__version__}',
                         f'transformers=={transformers.__version__}']),
  )
  print(f'wrote {out} ({out.stat().st_size} bytes), ids shape {tuple(batch["input_ids"].shape)}')


if __name__ == '__main__':
  main(sys.argv[1], pathlib.Path(__file__).with_name('minilm_reference.npz'))
