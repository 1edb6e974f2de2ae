"""LoRA on MiniLM-L6 for the sentiment of VADER's movie-review sentences.

COMMAND: python -m experiments.run --config=configs/minilm_vader_lora.py --workdir=runs/minilm_vader_lora
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict({'name': 'minilm', 'remat': False})
  c.data = ml_collections.ConfigDict(
      {'name': 'vader', 'domain': 'movie', 'max_length': 64, 'bucket': 16, 'limit': 0,
       'group_by_length': 0})  # > 0: batches of similar length, in groups of that many batches
  c.method = ml_collections.ConfigDict({
      'name': 'lora', 'targets': ('encoder/.*/kernel',), 'rank': 8, 'alpha': 16.0,
      'dropout': 0.1, 'rslora': False})
  # head.init: an adapter directory whose saved head starts training ('' = random init).
  c.head = ml_collections.ConfigDict({'init': ''})
  c.optimizer = ml_collections.ConfigDict({
      'lr': 1e-3, 'weight_decay': 0.01, 'b1': 0.9, 'b2': 0.999, 'eps': 1e-8,
      'schedule': 'constant', 'warmup_steps': 0, 'clip_norm': 0.0})
  c.train = ml_collections.ConfigDict({
      'batch_size': 32, 'eval_batch_size': 64, 'epochs': 3, 'max_steps': 0, 'log_every': 20,
      'eval_every': 0,  # extra val evaluations every that many steps (0: once per epoch)
      'checkpoint_every': 100, 'keep_checkpoints': 2,
      'accumulate': 1,  # micro-batches per step (gradient accumulation)
      'compute_dtype': 'float32',  # or 'bfloat16' (float32 master weights and optimiser)
      'halt_at_step': 0})  # halt_at_step: stop abruptly there, as a crash would (resume tests).
  # Devices: -1 takes all the rest. fsdp shards weights and batch, tensor shards heads / MLP.
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  # Multi-process runs (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  # auto=True on TPU pods, SLURM, MPI).
  c.distributed = ml_collections.ConfigDict(
      {'coordinator_address': '', 'num_processes': 0, 'process_id': -1, 'auto': False})
  return c
