"""Exports a trained run's adapter to another library's format.

  python -m experiments.export --workdir=runs/minilm_vader_lora --to=hf OUT_DIR [--nohead]

`--to=hf`: an HF PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) of
the run's BERT or LLaMA, from any LoRA-shaped method (lora, rslora, lora_pro, pissa, milora,
soma, corda, eva, lora_ga; re-based methods as a rank-2r LoRA on the original weights). A
sentence task's linear head goes with it as the `classifier` of
`BertForSequenceClassification` (`modules_to_save`) unless `--nohead`. docs/hf_peft.md says
how to load it.
"""
from __future__ import annotations

import pathlib
import sys

from absl import app, flags, logging

from experiments import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'a finished run: its config.json and adapter/')
_TO = flags.DEFINE_enum('to', 'hf', ['hf'], 'the format: hf (HF PEFT LoRA)')
_HEAD = flags.DEFINE_bool('head', True, 'export the task head too (modules_to_save)')


def export_run(config, workdir: pathlib.Path, out: pathlib.Path, *, head: bool = True):
  """Writes the run's adapter (`WORKDIR/adapter`) to `out` as an HF PEFT adapter; returns the
  weights file's path."""
  from peftjax import models  # pylint: disable=g-import-not-at-top
  from peftjax.io import adapter_file, hf_peft  # pylint: disable=g-import-not-at-top
  model = models.build(config.model, config.seed)
  adapter, frozen, state, saved_head, meta = adapter_file.load_adapter(workdir / 'adapter',
                                                                       model.params)
  return hf_peft.export_adapter(out, adapter, frozen, state, model.params,
                                head=saved_head if head else None,
                                base_model=meta['base_model'])


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) != 2:
    raise app.UsageError('give one output folder: python -m experiments.export '
                         '--workdir=RUN --to=hf OUT_DIR')
  config = cli.loaded(flags.FLAGS.config)
  if not _WORKDIR.value:
    raise app.UsageError('--workdir: the run whose adapter to export')
  path = cli.run_cleanly(lambda: export_run(config, pathlib.Path(_WORKDIR.value),
                                            pathlib.Path(argv[1]), head=_HEAD.value))
  print(f'written {path.parent} ({_TO.value}: {path.stat().st_size:,} bytes of weights)')


if __name__ == '__main__':
  cli.define_run_or_config(sys.argv)
  app.run(main, flags_parser=cli.parse)
