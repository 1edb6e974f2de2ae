"""Continues a prompt with a trained run's language model, or a config's model as it is.

  python -m experiments.generate --workdir=runs/ul2r_smollm2_lora [--prompt="The capital of France is"] [--max_new_tokens=16]
  python -m experiments.generate --config=configs/smollm2_austen.py [--prompt=...]

Greedy decoding (KV-cached, `peftjax.models.decode`) with the run's adapter merged into its
base model (`WORKDIR/adapter`), or with the config's model alone; decoder-only models.
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np
from absl import app, flags, logging

from experiments import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'a finished run: its config.json and adapter/')
_PROMPT = flags.DEFINE_string('prompt', 'The capital of France is', 'the text to continue')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 16, 'the most tokens to add')


def continuation(config, workdir, prompt: str, max_new_tokens: int) -> str:
  """The greedy continuation of `prompt` by the run's (or the config's) model."""
  from peftjax import models  # pylint: disable=g-import-not-at-top
  from peftjax.core.adapter import merge  # pylint: disable=g-import-not-at-top
  from peftjax.io.adapter_file import load_adapter  # pylint: disable=g-import-not-at-top
  from peftjax.models import decode  # pylint: disable=g-import-not-at-top
  from peftjax.tasks import lm  # pylint: disable=g-import-not-at-top
  model = models.build(config.model, config.seed)
  params = model.params
  if workdir is not None:
    adapter, frozen, state, _, _ = load_adapter(pathlib.Path(workdir) / 'adapter', params)
    params = merge(adapter, frozen, state)
  tok = lm.load_tokenizer(config.data)
  out = decode.generate(model.module, params, np.asarray([tok.encode(prompt).ids], np.int32),
                        max_new_tokens=max_new_tokens, eos_id=lm.eos_id(tok))
  return tok.decode(np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist())


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = cli.loaded(flags.FLAGS.config)
  text = cli.run_cleanly(lambda: continuation(config, _WORKDIR.value, _PROMPT.value,
                                              _MAX_NEW.value))
  print(f'{_PROMPT.value!r} -> {text!r}')


if __name__ == '__main__':
  cli.define_run_or_config(sys.argv)
  app.run(main, flags_parser=cli.parse)
