"""The low-rank family side by side: MiniLM-L6 on VADER movie reviews, 200 steps per run.

COMMAND: python -m experiments.run --config=configs/lowrank_study.py --workdir=runs/lowrank_study

Matched settings for every adapter: all encoder kernels (q, k, v, o, FFN in/out of the six
layers), rank 8, AdamW lr 1e-3 (constant), weight decay 0.01, batch 16, no dropout (SVFit and
LoLDU have none), seeds 0..n-1 (a seed sets the adapter's random init, the head, the data
order). Each method keeps its paper's scaling: LoRA, rsLoRA, EVA, LoRA-GA and LoRA-Pro alpha 16;
PiSSA, MiLoRA and CorDA scale 1 (alpha = r, as in their papers); SORSA gamma 4e-4. Full
fine-tuning uses its own config's lr (5e-5). Data-initialised methods calibrate on the first 8
training batches. The headline rows (the convergence claims, and LoRA) run 3 seeds; the last
three rows repeat LoRA, PiSSA and SORSA at a lower learning rate.
`--config.only=lora,pissa` runs a subset; finished runs are skipped, so a stopped study continues.
"""
import ml_collections

from configs import minilm_vader_lora

TARGETS = ('encoder/.*/kernel',)


def get_config():
  base = minilm_vader_lora.get_config()
  base.method = ml_collections.ConfigDict({'name': 'lora'})
  base.train.batch_size = 16
  base.train.epochs = 1
  base.train.max_steps = 200
  base.train.checkpoint_every = 0
  base.train.log_every = 50
  base.calibration = ml_collections.ConfigDict({'batches': 8})

  def run(name, seeds=1, lr=None, **kwargs):
    return {'method': {'name': name, 'targets': TARGETS, **kwargs}, 'seeds': seeds,
            'lr': lr or base.optimizer.lr}

  c = ml_collections.ConfigDict()
  c.base = base
  c.report_steps = (50, 200)  # train loss reported as the mean of the `window` steps up to these
  c.window = 10
  c.only = ''
  c.runs = ml_collections.ConfigDict({
      'lora': run('lora', 3, rank=8, alpha=16.0),
      'rslora': run('rslora', rank=8, alpha=16.0),
      'pissa': run('pissa', 3, rank=8),
      'milora': run('milora', rank=8),
      'sorsa': run('sorsa', 3, rank=8, gamma=4e-4),
      'svfit': run('svfit', rank=8),
      'loldu': run('loldu', rank=8),
      'corda_kpm': run('corda', rank=8, mode='kpm'),
      'corda_ipm': run('corda', rank=8, mode='ipm'),
      'eva': run('eva', 3, rank=8, alpha=16.0),
      'lora_ga': run('lora_ga', 3, rank=8, alpha=16.0),
      'lora_pro': run('lora_pro', rank=8, alpha=16.0),
      'full': {'method': {'name': 'full'}, 'seeds': 1, 'lr': 5e-5},
      # Learning-rate check for the principal-component inits (see docs/lowrank_study.md).
      'lora_lr3e-4': run('lora', 2, lr=3e-4, rank=8, alpha=16.0),
      'pissa_lr3e-4': run('pissa', 2, lr=3e-4, rank=8),
      'sorsa_lr3e-4': run('sorsa', 2, lr=3e-4, rank=8, gamma=4e-4),
  }, sort_keys=False)  # the table's row order
  return c
