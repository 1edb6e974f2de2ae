"""Optax transforms and training algorithms (LoRA-Pro, ...)."""
from peftjax.optim.lora_pro import adjusted_grads, equivalent_gradient, lora_pro, lora_pro_adamw
