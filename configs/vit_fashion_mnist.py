"""Pretraining of the project's Vision Transformer on Fashion-MNIST: every param trained from
a random init (`full`), the checkpoint that the vision transfer experiments start from.

COMMAND: python -m experiments.pretrain_vit
(trains this config in runs/vit_fashion_mnist and caches the result as
~/.cache/peftjax/vit/fashion_mnist, the model `{'name': 'vit', 'checkpoint': 'fashion_mnist'}`;
skips when it is cached already)

ViT: patch 7 (16 tokens of 7x7 pixels), width 96, 6 pre-LN blocks of 4 heads, MLP 192, mean
pooling, no dropout (455k params): on 2 shared CPU cores an epoch of the 55,000 training
images takes about 2 minutes, and a 4x4 patch grid (49 tokens) costs 3 times as much per
image. AdamW, lr 1e-3 after 200 warm-up steps, cosine to 0, weight decay 0.05, gradients
clipped to norm 1, batches of 128, 4 epochs. No augmentation: four epochs do not overfit
(val accuracy still rises at the end).

Measured: MEASURED
"""
import ml_collections

from configs import minilm_vader

VIT = {'patch_size': 7, 'hidden_size': 96, 'num_layers': 6, 'num_heads': 4,
       'intermediate_size': 192, 'pool': 'mean'}


def get_config():
  c = minilm_vader.get_config('full')  # the trainer's keys with their defaults
  c.task = 'image_classification'
  c.model = ml_collections.ConfigDict({'name': 'vit', 'remat': False, 'init': '', **VIT})
  c.data = ml_collections.ConfigDict({'name': 'fashion_mnist', 'limit': 0})
  c.optimizer.update({'lr': 1e-3, 'weight_decay': 0.05, 'schedule': 'cosine',
                      'warmup_steps': 200, 'clip_norm': 1.0})
  c.train.update({'batch_size': 128, 'eval_batch_size': 500, 'epochs': 4, 'log_every': 50,
                  'checkpoint_every': 200})
  return c
