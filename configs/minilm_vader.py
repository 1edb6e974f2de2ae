"""Fine-tune MiniLM-L6 for the sentiment of VADER's movie-review sentences with any method.

COMMAND: python -m experiments.run --config=configs/minilm_vader.py:METHOD --workdir=runs/NAME

METHOD is any name of `peftjax.methods.REGISTRY` (default `lora`): LoRA at rank 8, alpha 16,
dropout 0.1 on every encoder kernel; the other methods on the same kernels with their own
(paper) defaults; `s2ft` with its defaults on MiniLM's 12 heads; `sara` with the official
run's settings: the optimiser's lr for its threshold (1e-3 * exp(-350 * 2e-3)), cosine decay,
the progressive re-selection halfway through; `full` (lr 5e-5) and `probe`
(the head alone). `adapter` and `mosa` insert bottleneck modules of width 32 (about LoRA's
trainable count) after each sub-layer's output projection (Houlsby's placement, sequential
with the residual); `low_precision` trains that adapter quantised to 1 bit. `vpt` and `dvpt`
put 10 prompts before each layer (VPT-deep), extending its attention mask. `side` trains a
side network of width 64 (UniPT) on every layer's detached output, fused into the encoder's
output with the encoder's attention mask. `graft` grafts the
`full` run in `runs/minilm_vader_full` (its adapter) as the official code does: a mask over
every encoder-layer parameter (embeddings and head fixed), the run's head frozen
(`head_lr_scale` 0), plain full-batch gradient descent on the scores at lr 1e7
(`optimizer.name` 'sgd', no weight decay), 10 steps of 1,024 sentences (32 micro-batches of
32), val after each, the best kept. `ssf` on every encoder kernel and LayerNorm, `ia3` on
keys, values and the FFN activations, `bitfit` and `ln_tuning` on every bias / LayerNorm,
each at its official code's lr (SSF's VTAB scripts 5e-3, t-few's (IA)³ 3e-3, BitFit's
run_glue 1e-3; LN tuning the default 1e-3) and without weight decay, as their official
optimisers leave these vectors undecayed. Every key the trainer reads is here, with its default; `--config.KEY=VALUE`
changes one.
"""
import inspect

import ml_collections

from peftjax import methods
from peftjax.methods.sparse_low_rank import sara_lr

TARGETS = ('encoder/.*/kernel',)
# HFT takes full fine-tuning's settings; SaRA the official optimiser's default.
LEARNING_RATES = {'full': 5e-5, 'hft': 5e-5, 'sara': sara_lr()}
LEARNING_RATES |= {'ssf': 5e-3, 'ia3': 3e-3, 'bitfit': 1e-3}
# R-AMT's official Adam lr for its masks (8e-5, cosine); the new head learns at the usual 1e-3.
LEARNING_RATES |= {'mask_tuning': 8e-5}
SCHEDULES = {'mask_tuning': 'cosine', 'sara': 'cosine'}
HEAD_LEARNING_RATES = {'graft': 0.0, 'mask_tuning': 1e-3}  # default: the method's lr
NO_WEIGHT_DECAY = ('ssf', 'ia3', 'bitfit', 'ln_tuning')
# The scale-and-shift methods on MiniLM's layout (BitFit and LN tuning: their defaults).
SCALE_SHIFT = {'ssf': {'targets': ('encoder/.*/kernel', 'norm/scale$')},
               'ia3': {'targets': ('attention/(key|value)/kernel$',),
                       'feedforward': (r'layer_\d+/output/kernel$',)}}
FULL_RUN_ADAPTER = 'runs/minilm_vader_full/adapter'  # what `graft` grafts
# Grafting as the official code trains its mask (Grafting.py, src/graft_trainer.py,
# run_graft_task.sh): every parameter of the encoder's layers (`select_trainable_parameters`
# with fix_embeddings, fix_head), plain gradient descent at lr 1e7 on the gradient averaged
# over 128 batches of 8 (1,024 sentences), one step per 'epoch', 10 of them; the best mask
# on train + val kept (here: on val, checked after every step).
GRAFT_TARGETS = (r'encoder/layer_\d+/',)
GRAFT_LR = 1e7
GRAFT_TRAIN = {'batch_size': 1024, 'accumulate': 32, 'epochs': 2, 'max_steps': 10,
               'eval_every': 1}
MINILM_HEADS = 12
# Modules (not params) that bottleneck adapters wrap: each sub-layer's output projection.
ADAPTER_TARGETS = (r'attention/output$', r'layer_\d+/output$')
# Blocks that prompts (`vpt`, `dvpt`) enter: every layer (VPT-deep); side tuning reads them.
PROMPT_TARGETS = (r'encoder/layer_\d+$',)
SIDE_OUTPUT = 'encoder$'  # the module whose output side tuning's network fuses into


def method_config(name: str) -> dict:
  """The method block for `name`: LoRA as the main job runs it; other methods on `TARGETS`
  where they take targets, with their own defaults."""
  if name not in methods.REGISTRY:
    raise ValueError(f'unknown method {name!r} after the config file\'s ":"; known: '
                     f'{sorted(methods.REGISTRY)}')
  if name == 'lora':
    return {'name': name, 'targets': TARGETS, 'rank': 8, 'alpha': 16.0, 'dropout': 0.1}
  if name == 's2ft':  # its selection of attention heads needs MiniLM-L6's head count
    return {'name': name, 'num_heads': MINILM_HEADS}
  if name in ('adapter', 'mosa'):
    return {'name': name, 'targets': ADAPTER_TARGETS, 'size': 32}
  if name == 'graft':
    return {'name': name, 'targets': GRAFT_TARGETS, 'finetuned': FULL_RUN_ADAPTER}
  if name == 'sara':  # the official run: selected again at step 2500 of 5005
    return {'name': name, 'targets': TARGETS, 'progressive': 0.5}
  if name == 'mask_tuning':  # the official settings: attention only (MASK_MLP False), MASK_LOSS
    return {'name': name, 'targets': (r'attention/(query|key|value|output)/kernel$',),
            'reg': 1e-4}
  if name in SCALE_SHIFT:
    return {'name': name, **SCALE_SHIFT[name]}
  if name in ('vpt', 'dvpt'):  # deep prompts before each layer, which take the mask second
    return {'name': name, 'targets': PROMPT_TARGETS, 'length': 10, 'mask': 1}
  if name == 'side':  # reads every layer, fuses into the encoder's output (mask second)
    return {'name': name, 'targets': PROMPT_TARGETS, 'output': SIDE_OUTPUT, 'size': 64,
            'mask': 1}
  if name == 'low_precision':  # the `adapter` method trained 1-bit (Bi-AdaptFormer's bits)
    return {'name': name, 'bits': 1,
            'adapter': {'method': 'adapter', 'targets': ADAPTER_TARGETS, 'size': 32}}
  targets = inspect.signature(methods.REGISTRY[name]).parameters.get('targets')
  needs_targets = targets is not None and targets.default is inspect.Parameter.empty
  return {'name': name, **({'targets': TARGETS} if needs_targets else {})}


def get_config(method: str = 'lora'):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'sentence_classification'
  c.model = ml_collections.ConfigDict({'name': 'minilm', 'remat': False})
  c.data = ml_collections.ConfigDict(
      {'name': 'vader', 'domain': 'movie', 'max_length': 64, 'bucket': 16, 'limit': 0,
       'group_by_length': 0})  # > 0: batches of similar length, in groups of that many batches
  c.method = ml_collections.ConfigDict(method_config(method))
  # head.init: an adapter directory whose saved head starts training ('' = random init).
  c.head = ml_collections.ConfigDict({'init': FULL_RUN_ADAPTER if method == 'graft' else ''})
  # Training batches that data-initialised methods (CorDA, EVA, LoRA-GA, SPT) calibrate on.
  c.calibration = ml_collections.ConfigDict({'batches': 8})
  lr = LEARNING_RATES.get(method, 1e-3)
  c.optimizer = ml_collections.ConfigDict({
      'name': 'adamw',  # or 'sgd' (plain gradient descent)
      'lr': lr, 'weight_decay': 0.0 if method in NO_WEIGHT_DECAY else 0.01, 'b1': 0.9,
      'b2': 0.999, 'eps': 1e-8,
      'schedule': SCHEDULES.get(method, 'constant'),  # or 'cosine' (after warmup_steps, to 0)
      'warmup_steps': 0, 'clip_norm': 0.0,
      # the head's lr as a multiple of lr (0: the head stays frozen)
      'head_lr_scale': HEAD_LEARNING_RATES.get(method, lr) / lr})
  c.train = ml_collections.ConfigDict({
      'batch_size': 32, 'eval_batch_size': 64, 'epochs': 3, 'max_steps': 0, 'log_every': 20,
      'eval_every': 0,  # extra val evaluations every that many steps (0: once per epoch)
      'eval_at_start': False,  # a val evaluation before the first step
      'checkpoint_every': 100, 'keep_checkpoints': 2,
      'accumulate': 1,  # micro-batches per step (gradient accumulation)
      'compute_dtype': 'float32'})  # or 'bfloat16' (float32 master weights and optimiser)
  if method == 'graft':  # the official plain gradient steps, batches and step count
    c.optimizer.update({'name': 'sgd', 'lr': GRAFT_LR, 'weight_decay': 0.0})
    c.optimizer.head_lr_scale = 0.0
    c.train.update(GRAFT_TRAIN)
  # Devices: -1 takes all the rest. fsdp shards weights and batch, tensor shards heads / MLP.
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  # Multi-process runs (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  # auto=True on TPU pods, SLURM, MPI).
  c.distributed = ml_collections.ConfigDict(
      {'coordinator_address': '', 'num_processes': 0, 'process_id': -1, 'auto': False})
  return c
