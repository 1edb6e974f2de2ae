"""LoRA-Pro: "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?" (Wang & Liang, 2024).

Plain LoRA whose `Adapter.tx` replaces the factor gradients by the closed-form ones of
`peftjax.optim.lora_pro` (derivation there). `train.step.make_optimizer` runs the adapter's
`tx` before AdamW: that is the authors' default optimiser (`mode="efficient"`: adjust, then
Adam moments of the adjusted rank-r gradients). Followed by `optax.sgd` it is the paper's SGD
LoRA-Pro. The paper's AdamW-equivalent variant, with full-size moments, replaces AdamW
instead: `optim.lora_pro_adamw(scales(adapter.config), lr)` in place of make_optimizer.
"""
from __future__ import annotations

from typing import Callable

from peftjax.core import paths as P
from peftjax.core.adapter import Adapter
from peftjax.methods.lora import lora, scale_of
from peftjax.optim.lora_pro import lora_pro as lora_pro_transform


def scales(config: dict) -> Callable[[str], float]:
  """The LoRA scale of each target path, from a lora / rslora / lora_pro config."""
  scale = scale_of(config)
  return lambda path: scale(path, P.first_match(path, config.get('rank_pattern'), config['rank']))


def lora_pro(targets, rank: int = 8, alpha: float = 16.0, *, x_mode: str = 'sylvester',
             damping: float = 1e-8, **lora_kwargs) -> Adapter:
  """LoRA (same arguments as `methods.lora`) trained with LoRA-Pro's adjusted gradients.

  "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?" (Wang & Liang, 2024,
  arXiv:2407.18242): the factor gradients are replaced (`Adapter.tx`) by those whose
  low-rank step best approximates the full-gradient step.

  Args:
    targets, rank, alpha, **lora_kwargs: as `lora`.
    x_mode: 'sylvester' (the paper's Theorem 2.2) or 'zero'; see `optim.lora_pro`.
    damping: ε added to AᵀA and BBᵀ before inverting.

  Returns:
    LoRA's `Adapter` with a `tx` that adjusts the factor gradients.

  Example:
    >>> import peftjax as pj
    >>> adapter = pj.lora_pro('attention/(query|value)/kernel', rank=8)
    >>> adapter.config['method'], adapter.tx is not None
    ('lora_pro', True)
  """
  base = lora(targets, rank, alpha, **lora_kwargs)
  config = {**base.config, 'method': 'lora_pro', 'x_mode': x_mode, 'damping': damping}
  tx = lora_pro_transform(scales(config), x_mode=x_mode, damping=damping)
  return base._replace(config=config, tx=tx)
