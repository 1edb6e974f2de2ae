"""How far each saved adapter moved the effective weights: median over the adapted encoder
kernels of ||W_adapted - W|| / ||W||, per run of a study.

  python -m experiments.weight_change runs/lowrank_study lora pissa lora_ga [--seed=0]
"""
from __future__ import annotations

import argparse
import pathlib

import numpy as np

from peftjax.analysis import relative_change
from peftjax.models import minilm


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
