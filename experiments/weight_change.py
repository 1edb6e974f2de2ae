"""How far each saved adapter moved the effective weights: median over the adapted encoder
kernels of ||W_adapted - W|| / ||W||, per run of a study.

  python -m experiments.weight_change runs/lowrank_study lora pissa lora_ga [--seed=0]
"""
from __future__ import annotations

import argparse
import pathlib

import numpy as np

from peftjax.core import paths as P
from peftjax.core.leaves import materialize
from peftjax.io.adapter_file import load_adapter
from peftjax.models import minilm


def relative_change(adapter_dir, params) -> dict[str, float]:
  adapter, frozen, state, _, _ = load_adapter(adapter_dir, params)
  adapted = P.flatten(materialize(adapter.apply(frozen, state)))
  base = P.flatten(params)
  return {p: float(np.linalg.norm(np.asarray(adapted[p]) - base[p]) / np.linalg.norm(base[p]))
          for p in base if np.ndim(base[p]) == 2 and not np.array_equal(adapted[p], base[p])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdir', type=pathlib.Path)
  parser.add_argument('runs', nargs='+')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  _, params = minilm.load_minilm()
  print('| run | kernels changed | median ‖ΔW‖/‖W‖ | max |\n|---|---|---|---|')
  for run in args.runs:
    rel = relative_change(args.workdir / run / f'seed_{args.seed}' / 'adapter', params)
    print(f'| {run} | {len(rel)} | {np.median(list(rel.values())):.3f} | '
          f'{max(rel.values()):.3f} |', flush=True)


if __name__ == '__main__':
  main()
