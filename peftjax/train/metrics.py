"""Metrics as JSON lines, and the loss/accuracy curves as a PNG."""
from __future__ import annotations

import json
import pathlib

from peftjax.io.files import atomic_write_text


class MetricsLog:
  """Appends one JSON object per line; `rewind(step)` drops what a crashed run logged later."""

  def __init__(self, path):
    self.path = pathlib.Path(path)

  def write(self, records):
    with self.path.open('a') as f:
      for r in records:
        f.write(json.dumps(r) + '\n')

  def read(self) -> list[dict]:
    if not self.path.exists():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

  def rewind(self, step: int):
    """Keeps the train/val records up to `step` (the step a resumed run restarts from)."""
    kept = [r for r in self.read() if r['kind'] in ('train', 'val') and r['step'] <= step]
    atomic_write_text(self.path, ''.join(json.dumps(r) + '\n' for r in kept))


def plot_curves(records: list[dict], path, title: str = ''):
  """Train loss per step (with a moving average) and val accuracy per epoch."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np

  train = [r for r in records if r['kind'] == 'train']
  val = [r for r in records if r['kind'] == 'val']
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
  if train:
    steps = np.array([r['step'] for r in train])
    loss = np.array([r['loss'] for r in train])
    ax1.plot(steps, loss, alpha=0.3, lw=0.8, label='per step')
    w = min(25, len(loss))
    ax1.plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, 'valid'), label=f'mean of {w}')
    ax1.legend()
  ax1.set(xlabel='step', ylabel='train loss')
  if val:
    ax2.plot([r['epoch'] for r in val], [r['accuracy'] for r in val], 'o-')
  ax2.set(xlabel='epoch', ylabel='val accuracy')
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
