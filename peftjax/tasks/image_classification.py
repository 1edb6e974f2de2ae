"""Image classification: a linear head on a model's pooled image features (or an attentive
head over its token states, `head.kind='attentive'`, `peftjax.tasks.heads`), cross-entropy.

The data are the 28x28 grey image sets of `peftjax.data.images` (Fashion-MNIST, the 5k MNIST
subset, scikit-learn's digits); the model is any module called as `module(images, train=)`
on float32 images [B, 28, 28, 1] that returns features [B, width] (the bundled ViT by
default); an attentive head calls it with `tokens=True` for token states [B, tokens, width].
Metrics: loss and accuracy.
"""
from __future__ import annotations

from typing import Iterator

import jax
import numpy as np

from peftjax.data import images
from peftjax.models import Model, build
from peftjax.tasks import heads
from peftjax.tasks.classification import Classification


class ImageClassification(Classification):
  """Classify images with a linear head on the model's features.

  Args:
    model: maps images [B, 28, 28, 1] to features [B, width].
    data: `{split: images.Images}`.
    num_classes: default: the largest training label + 1.
    head: the head's kind and sizes (`heads.HeadSpec`; default: linear on pooled features).
  """

  def __init__(self, model: Model, data: dict[str, images.Images], *,
               num_classes: int | None = None, head: heads.HeadSpec = heads.HeadSpec()):
    self.model, self.data, self.head_spec = model, data, head
    self.num_classes = num_classes or int(data['train'].labels.max()) + 1

  @classmethod
  def from_config(cls, config, model: Model | None = None) -> ImageClassification:
    """The splits of `config.data.name` (one of `images.DATASETS`; the first `limit` rows of
    each split if `limit` > 0) for `config.model` (built from the config unless given)."""
    d = config.data
    if d.name not in images.DATASETS:
      raise ValueError(f'unknown data set {d.name!r} for image classification; expected one '
                       f'of {images.DATASETS}')
    limit = d.get('limit', 0)
    data = {split: rows.take(slice(limit or None))
            for split, rows in images.load_split(d.name).items()}
    return cls(model or build(config.model, config.seed), data, num_classes=images.NUM_CLASSES,
               head=heads.spec(config))

  def num_batches(self, split, batch_size):
    return images.num_batches(len(self.data[split]), batch_size)

  def batches(self, split, batch_size, *, seed=None, epoch=0, start=0,
              rows=slice(None)) -> Iterator[dict]:
    return images.batches(self.data[split], batch_size, seed=seed, epoch=epoch, start=start,
                          rows=rows)

  def batch_shapes(self, batch_size):
    shape = (batch_size, images.IMAGE_SIZE, images.IMAGE_SIZE, 1)
    return [{'images': jax.ShapeDtypeStruct(shape, np.float32),
             'labels': jax.ShapeDtypeStruct((batch_size,), np.int32),
             'weights': jax.ShapeDtypeStruct((batch_size,), np.float32)}]

  @property
  def _outputs(self) -> dict:
    """What the head reads: token states (attentive) or pooled features (linear)."""
    return {'tokens': True} if self.head_spec.attentive else {}

  @property
  def width(self) -> int:
    """The size of the model's features (or token states, for an attentive head)."""
    x = jax.ShapeDtypeStruct(self.batch_shapes(1)[0]['images'].shape, np.float32)
    out = jax.eval_shape(lambda p, x: self.model.apply(p, x, **self._outputs),
                         self.model.params, x)
    if self.head_spec.attentive and len(out.shape) != 3:
      raise ValueError(f'an attentive head needs a model that returns token states [B, tokens, '
                       f'width] with tokens=True; {self.model.model_id} returns shape '
                       f'{out.shape}')
    if not self.head_spec.attentive and len(out.shape) != 2:
      raise ValueError(f'image classification needs a model that returns features [B, width]; '
                       f'{self.model.model_id} returns shape {out.shape}')
    return out.shape[-1]

  def init_head(self, rng):
    return heads.build(rng, self.head_spec, self.width, self.num_classes)

  def logits(self, params, head, batch, *, rng=None):
    out = self.model.apply(params, batch['images'], train=rng is not None, rng=rng,
                           **self._outputs)
    features = heads.attentive_pool(head, out) if self.head_spec.attentive else out
    return features @ head['kernel'] + head['bias']

