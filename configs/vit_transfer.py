"""Transfer of the project's pretrained ViT to MNIST and scikit-learn's digits: a small
VTAB-style suite of fine-tuning methods side by side (`experiments.compare`).

COMMAND: python -m experiments.run --config=configs/vit_transfer.py --workdir=runs/vit_transfer

The ViT pretrained on Fashion-MNIST (`{'name': 'vit', 'checkpoint': 'fashion_mnist'}`; made
first by `python -m experiments.pretrain_vit`) transferred to the 5k MNIST subset (4,000
training images) and to the 1,797 digits resized to 28x28 (1,437), each with: full
fine-tuning, the linear probe, the attentive probe (efficient probing, 8 queries,
`peftjax.tasks.heads`), LoRA (rank 4 on every encoder kernel), bottleneck adapters of width 8
after each sub-layer's output projection in each placement (sequential / parallel, with /
without the residual), the parallel adapter trained at 1 bit, MoSA (the same adapter as 4
sparse modules, one active per step), SSF (at its official 5e-3), VPT-shallow, VPT-deep and
DVPT (10 prompts) and side tuning (UniPT, width 32, every block read). Columns: test
accuracy, trainable params, adapter bytes, peak RSS and steps/s. Results: docs/vit_transfer.md.

SSF's claim (SSF well above the linear probe and close to full fine-tuning) is checked over
seeds 0, 1 and 2 of those three rows (`CLAIM_ROWS`): each row's mean with a 95% t interval,
and SSF's paired differences to the probe and to full fine-tuning.

Budget: batches of 64, AdamW with a cosine schedule from the peak to 0, 3 epochs of MNIST
(189 steps) and 6 of digits (138) per row: 42 processes, each compiling once; finished runs
are skipped when the command runs again.

Learning rates: full fine-tuning 3e-4 (under the pretraining's 1e-3 peak), the inserted and
low-rank modules 3e-3, the attentive probe 1e-2; the new linear head learns at 5e-2 in every
row (`HEAD_LR`, through `optimizer.head_lr_scale`). Measured on MNIST with
`--config.only=mnist_full,mnist_linear_probe,mnist_attentive_probe` and each run's
`train.max_steps=60` (the cosine over those 60 steps; load average 10-15 on 2 cores): full
fine-tuning at 1e-4 with its head at 1e-4 reached 28% val accuracy (0.98 steps/s), at 3e-4 with
the head at 5e-2 69% (test 67.6%); the linear probe at 1e-2 38% (5.9 steps/s), at 5e-2 48%
(test 50.6%); the attentive probe at 3e-3 38% (4.2 steps/s), at 1e-2 46% (test 44.4%);
LoRA at 3e-3 68% (test 66.4%, 3.4 steps/s), the sequential adapter at 3e-3 52% (test 52.2%,
3.2 steps/s), both with the head at 5e-2. The adapters' rate is the least tuned.

`:tiny`: a random TINY_VIT on 32 rows of each split, three rows per data set (the suite's test).
"""
import ml_collections

from configs import minilm_vader, vit_fashion_mnist
from peftjax.models import TINY_VIT

DATA = {'mnist': 3, 'digits': 6}  # data set -> epochs
PRETRAINED = {'name': 'vit', 'checkpoint': 'fashion_mnist', 'remat': False, 'init': ''}
ADAPTER_TARGETS = minilm_vader.ADAPTER_TARGETS  # the ViT's modules have the same names
HEAD = {'init': '', 'kind': 'linear', 'queries': 8, 'value_reduction': 1}  # linear by default
ATTENTIVE_HEAD = {'kind': 'attentive'}
PLACEMENTS = {'seq': ('sequential', True), 'seq_nores': ('sequential', False),
              'par': ('parallel', False), 'par_res': ('parallel', True)}

HEAD_LR = 5e-2  # the new task head's learning rate in every row but the attentive probe's
LAYERS = r'encoder/layer_\d+$'  # VPT-deep's and DVPT's blocks; VPT-shallow prompts the encoder
PATCH_KERNEL = 'embeddings/patch/kernel$'  # VPT's prompt init takes its fan-in

# row -> (method block, head block, learning rate)
SETTINGS = {
    'full': ({'name': 'full'}, {}, 3e-4),
    'linear_probe': ({'name': 'probe'}, {}, HEAD_LR),
    'attentive_probe': ({'name': 'probe'}, ATTENTIVE_HEAD, 1e-2),
    'lora': ({'name': 'lora', 'targets': minilm_vader.TARGETS, 'rank': 4, 'alpha': 8.0,
              'dropout': 0.0}, {}, 3e-3),
    # A parallel adapter's residual adds the module's input: only where the width is kept
    # (the attention output projection; the FFN's output narrows from 4x the width).
    **{f'adapter_{short}': ({'name': 'adapter', 'size': 8, 'placement': placement,
                             'residual': residual,
                             'targets': ('attention/output$',) if short == 'par_res'
                             else ADAPTER_TARGETS}, {}, 3e-3)
       for short, (placement, residual) in PLACEMENTS.items()},
    # The parallel adapter trained quantised to 1 bit (Bi-AdaptFormer's quantisation-aware
    # training, `low_precision`); the suite's docs also quantise trained adapters afterwards.
    'adapter_par_1bit': ({'name': 'low_precision', 'bits': 1, 'adapter': {
        'method': 'adapter', 'size': 8, 'placement': 'parallel', 'residual': False,
        'targets': ADAPTER_TARGETS}}, {}, 3e-3),
    'mosa': ({'name': 'mosa', 'targets': ADAPTER_TARGETS, 'size': 8, 'modules': 4,
              'active': 1}, {}, 3e-3),
    'ssf': ({'name': 'ssf', 'targets': ('encoder/.*/kernel', 'norm/scale$')}, {}, 5e-3),
    'vpt_shallow': ({'name': 'vpt', 'targets': ('encoder$',), 'length': 10,
                     'fan_in': PATCH_KERNEL}, {}, 3e-3),
    'vpt_deep': ({'name': 'vpt', 'targets': (LAYERS,), 'length': 10, 'fan_in': PATCH_KERNEL},
                 {}, 3e-3),
    'dvpt': ({'name': 'dvpt', 'targets': (LAYERS,), 'length': 10, 'size': 8}, {}, 3e-3),
    # UniPT's side network (width 32 of the ViT's 96) on every block's detached output, fused
    # into the encoder's normed tokens, which the mean pooling reads.
    'side': ({'name': 'side', 'targets': (LAYERS,), 'output': 'encoder$', 'size': 32}, {},
             3e-3),
}
TINY_ROWS = ('full', 'linear_probe', 'attentive_probe')
# SSF's claim (well above the linear probe, close to full fine-tuning), over seeds 0, 1, 2.
CLAIM_ROWS, CLAIM_SEEDS = ('full', 'linear_probe', 'ssf'), (1, 2)
VARIANTS = ('', 'tiny')


def rows(tiny: bool = False) -> list[str]:
  """The suite's methods in table order."""
  return list(TINY_ROWS if tiny else SETTINGS)


def run_config(row: str, data: str, tiny: bool = False):
  """The training config of one row on one data set."""
  method, head, lr = SETTINGS[row]
  c = vit_fashion_mnist.get_config()
  c.model = ml_collections.ConfigDict(
      {**TINY_VIT, 'remat': False, 'init': ''} if tiny else PRETRAINED)
  c.data = ml_collections.ConfigDict({'name': data, 'limit': 32 if tiny else 0})
  c.method = ml_collections.ConfigDict(method)
  c.head = ml_collections.ConfigDict({**HEAD, **head})
  head_lr = lr if c.head.kind == 'attentive' else HEAD_LR
  c.optimizer.update({'lr': lr, 'head_lr_scale': head_lr / lr, 'weight_decay': 0.01,
                      'schedule': 'cosine', 'warmup_steps': 0, 'clip_norm': 1.0})
  c.train.update({'batch_size': 16 if tiny else 64, 'eval_batch_size': 32 if tiny else 500,
                  'epochs': 1 if tiny else DATA[data], 'log_every': 1 if tiny else 20,
                  'checkpoint_every': 0})
  return c


def get_config(variant: str = ''):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} after the config file's ':'; expected one "
                     f'of {VARIANTS}')
  tiny = variant == 'tiny'
  runs, labels, seeds, differences = {}, {}, {}, []
  for data in DATA:
    for row in rows(tiny):
      runs[f'{data}_{row}'] = run_config(row, data, tiny)
      labels[f'{data}: {row}'] = f'{data}_{row}'
    for row in () if tiny else CLAIM_ROWS:
      seeds[f'{data}: {row}'] = [f'{data}_{row}']
      for seed in CLAIM_SEEDS:
        runs[f'{data}_{row}_seed{seed}'] = run_config(row, data)
        runs[f'{data}_{row}_seed{seed}'].seed = seed
        seeds[f'{data}: {row}'].append(f'{data}_{row}_seed{seed}')
    if not tiny:
      differences += [(f'{data}: ssf', f'{data}: linear_probe'), (f'{data}: ssf', f'{data}: full')]
  c = ml_collections.ConfigDict()
  c.runs = ml_collections.ConfigDict(runs, sort_keys=False)
  c.rows = ml_collections.ConfigDict(labels, sort_keys=False)
  c.baseline = 'mnist: full'
  c.compose = ml_collections.ConfigDict()
  c.recovery = ml_collections.ConfigDict()
  c.seeds = ml_collections.ConfigDict(seeds, sort_keys=False)
  c.differences = differences
  c.only = ''
  return c
