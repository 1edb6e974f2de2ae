"""The language-modelling tasks: special ids, UL2 batches that reconstruct their chunks,
rank classification, and end-to-end runs of the LM configs on tiny models."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.data import austen, tokenizer as T
from peftjax.objectives import ul2
from peftjax.tasks import lm

TEXTS = [c.text for c in austen.chapters('val')[:3]]


@pytest.fixture(scope='module')
def toks():
  return (T.train_bpe(TEXTS, 400, num_sentinels=20),
          T.train_bpe(TEXTS, 400, num_sentinels=0, extra_special=()))


def test_special_ids_are_the_tokenizers_own_or_its_last_ids(toks):
  own, bare = toks
  sentinels, paradigm = lm.special_ids(own, ('[NLU]', '[S2S]'), 5)
  assert sentinels == T.sentinel_ids(own)[:5] == [399, 398, 397, 396, 395]
  assert paradigm == {'[NLU]': T.special_id(own, '[NLU]'), '[S2S]': T.special_id(own, '[S2S]')}
  # Without them: [NLU] [NLG] [S2S] from the top, the same whatever else is asked, then sentinels.
  sentinels, paradigm = lm.special_ids(bare, ('[S2S]', '[NLU]'), 4)
  assert paradigm == {'[NLU]': 399, '[S2S]': 397} and sentinels == [396, 395, 394, 393]
  assert lm.special_ids(bare, ('[S2S]',), 0) == ([], {'[S2S]': 397})
  with pytest.raises(ValueError, match="paradigm token '<x>' is not in the tokenizer"):
    lm.special_ids(bare, ('<x>',), 3)
  with pytest.raises(ValueError, match='the tokenizer has 20 sentinels'):
    lm.special_ids(own, (), 21)
  assert ul2.num_sentinels(128, ul2.UL2R.denoisers[2]) == 21  # X(0.5, 3): round(64 / 3)
  assert ul2.num_sentinels(128, ul2.UL2R.denoisers[3]) == 0  # S


def _denoising(fmt, per_row, mixture=ul2.UL2):
  rng = np.random.default_rng(0)
  chunks = {s: rng.integers(3, 300, (n, 48)).astype(np.int32)
            for s, n in (('train', 40), ('val', 12), ('test', 12))}
  sentinels, paradigm = lm.special_ids(T.train_bpe(TEXTS, 400, num_sentinels=40),
                                       mixture.paradigm_tokens, 40)
  return lm.Denoising(None, chunks, mixture, fmt, sentinel_ids=sentinels,
                      paradigm_ids=paradigm, bos_id=1, examples_per_row=per_row)


def _examples(task, batch):
  """(inputs, targets) of every packed example of a batch, read back from its rows."""
  out = []
  if task.format == 'prefix_lm':
    for r in range(len(batch['targets'])):
      for s in range(1, batch['segment_ids'][r].max() + 1):
        seg = batch['segment_ids'][r] == s
        a = int(batch['prefix'][r][seg].sum()) - 1
        seq = batch['targets'][r][seg]
        assert np.all(batch['weights'][r][seg] == (np.arange(seg.sum()) >= a))
        out.append((seq[:a], seq[a:]))
  else:
    for r in range(len(batch['targets'])):
      for s in range(1, batch['decoder_segment_ids'][r].max() + 1):
        out.append((batch['encoder_ids'][r][batch['encoder_segment_ids'][r] == s],
                    batch['targets'][r][batch['decoder_segment_ids'][r] == s]))
  return out


@pytest.mark.parametrize('fmt,per_row', [('prefix_lm', 1), ('prefix_lm', 3),
                                         ('encoder_decoder', 2)])
def test_ul2_rows_hold_whole_corruptions_of_the_chunks(fmt, per_row):
  task = _denoising(fmt, per_row)
  sentinels, paradigm_ids = task.sentinel_ids, set(task.paradigm_ids.values())
  seen = []
  for batch in task.batches('train', 4, seed=3, epoch=1):
    assert len(batch['targets']) == 4
    for inputs, targets in _examples(task, batch):
      assert inputs[0] in paradigm_ids  # every denoiser's paradigm token leads its inputs
      seen.append(ul2.reconstruct(inputs[1:], targets, sentinels))
  # Every chunk comes back exactly, once: nothing truncated, nothing dropped.
  assert sorted(map(tuple, seen)) == sorted(map(tuple, task.chunks['train']))


def test_ul2_batches_are_fixed_for_eval_fresh_per_epoch_and_resumable():
  task = _denoising('prefix_lm', 2, ul2.UL2R)
  same = lambda a, b: all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
  val = [list(task.batches('val', 4)) for _ in range(2)]
  assert same(*val)
  e0, e0b, e1 = (list(task.batches('train', 4, seed=0, epoch=e)) for e in (0, 0, 1))
  assert same(e0, e0b) and not same(e0, e1)
  assert same(list(task.batches('train', 4, seed=0, epoch=0, start=2)), e0[2:])
  part = list(task.batches('train', 4, seed=0, epoch=0, rows=slice(2, 4)))
  assert same(part, [{k: v[2:4] for k, v in b.items()} for b in e0])
  spec = task.batch_shapes(4)[0]
  assert all(b[k].shape == spec[k].shape for b in e0 for k in spec)


def test_unigram_loss_is_the_cross_entropy_of_target_frequencies():
  class Module:  # only the vocabulary size is read
    config = type('C', (), {'vocab_size': 400})

  task = _denoising('encoder_decoder', 1)
  task.model = type('M', (), {'module': Module})
  train = [b for b in task.batches('train', 8, seed=0)]
  counts = np.ones(400)
  for b in train:
    for t, w in zip(b['targets'].ravel(), b['weights'].ravel()):
      counts[t] += w
  p = counts / counts.sum()
  val = list(task.batches('val', 8))
  want = -sum(np.log(p[t]) for b in val for t, w in zip(b['targets'].ravel(),
                                                        b['weights'].ravel()) if w)
  want /= sum(b['weights'].sum() for b in val)
  assert lm.unigram_loss(task, 8) == pytest.approx(want, rel=1e-9)


def test_text_classification_ranks_the_class_words_at_the_first_target():
  words = [np.array([7, 9, 1]), np.array([8, 9, 1])]
  data = {'val': ([[3, 4, 5], [3, 4], [6], [5, 5, 5, 5]], np.array([0, 1, 1, 0]))}
  task = lm.TextClassification(None, data, words, 'prefix_lm', max_length=6, bos_id=1,
                               prefix_ids=[2])
  batch = next(task.batches('val', 6))
  np.testing.assert_array_equal(batch['first'][:4], [4, 3, 2, 5])  # [2] + text, then target
  np.testing.assert_array_equal(batch['label'][:4], [0, 1, 1, 0])
  np.testing.assert_array_equal(batch['row_weight'], [1, 1, 1, 1, 0, 0])
  # Logits that favour class 1's first token everywhere except at row 0's first target.
  logits = np.zeros((6, batch['targets'].shape[1], 12), np.float32)
  logits[..., 8] = 1.0
  logits[0, 4, 7] = 2.0
  task.logits = lambda params, batch, rng=None: jnp.asarray(logits)
  sums = task.eval_sums(None, {}, batch)
  assert float(sums['accuracy']) == 3.0 and float(sums['count']) == 4.0  # rows 0, 1, 2
  with pytest.raises(ValueError, match='must start with different tokens'):
    lm.TextClassification(None, data, [np.array([7, 1]), np.array([7, 2])], 'prefix_lm',
                          max_length=6, bos_id=1)


def test_ul2r_config_runs_on_a_tiny_llama_and_measures_the_start(tmp_path):
  from configs import ul2r_smollm2_lora
  from peftjax.train.loop import train
  summary = train(ul2r_smollm2_lora.get_config('tiny'), tmp_path)
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').open()]
  val = [r for r in records if r['kind'] == 'val']
  assert val[0]['step'] == 0 and val[-1]['step'] == 3
  assert summary['task'] == 'ul2' and np.isfinite(summary['test_loss'])
  assert summary['val_loss'] == min(r['loss'] for r in val if r['step'] > 0)
  out = subprocess.run([sys.executable, '-m', 'experiments.generate', f'--workdir={tmp_path}',
                        '--prompt=It is a truth', '--max_new_tokens=3'],
                       capture_output=True, text=True, check=True, timeout=600)
  assert out.stdout.startswith("'It is a truth' -> '")


@pytest.mark.long
def test_every_lora_family_method_and_full_train_a_step_on_smollm2(tmp_path):
  """Real SmolLM2 weights and shapes (its first two blocks, to keep compiles short)."""
  import dataclasses
  import ml_collections
  from configs import minilm_vader, ul2r_smollm2_lora
  from peftjax import methods
  from peftjax.io.params_file import save_params
  from peftjax.models import Model, smollm2
  from peftjax.models.llama import Llama
  from peftjax.train import step as S
  from peftjax.train.loop import method_from_config
  config, params = smollm2.load_smollm2()
  config = dataclasses.replace(config, num_layers=2)
  params = {k: v for k, v in params.items() if not k.startswith('layers_') or
            int(k.split('_')[1]) < 2}
  module = Llama(config)
  c = ul2r_smollm2_lora.get_config()
  c.data.limit, c.optimizer.schedule = 4, 'constant'  # (warmup would start at lr 0)
  task = lm.Denoising.from_config(c, Model(module, params, 'smollm2-2', module.logical_axes))
  batch = next(task.batches('train', 2, seed=0))
  # No head here: probe trains nothing. LLaMA has no biases: SSF's shifts have no place and
  # BitFit nothing to train. Prompts need blocks whose per-token argument is a padding mask
  # [..., L]; the decoder layer takes an [L, L] mask and positions. Side tuning's
  # cross-attention mixes every token with every other, which a causal LM must not.
  names = [n for n in methods.REGISTRY
           if n not in ('probe', 'ssf', 'bitfit', 'vpt', 'dvpt', 'side')]
  modules = ('self_attn/o_proj$', 'mlp/down_proj$')  # bottleneck adapters go around these
  for name in names:
    block = minilm_vader.method_config(name)
    block |= {'targets': ul2r_smollm2_lora.TARGETS} if 'targets' in block else {}
    if name in ('adapter', 'mosa'):
      block['targets'] = modules
    if name == 'low_precision':
      block['adapter']['targets'] = modules
    if name == 'ia3':  # keys, values and the gated FFN's product (the input of down_proj)
      block |= {'targets': ('self_attn/(k|v)_proj/kernel$',),
                'feedforward': ('mlp/down_proj/kernel$',)}
    if 'finetuned' in block:  # graft: a "fine-tuned" model, the base moved a little
      block['finetuned'] = str(save_params(tmp_path / 'finetuned.safetensors', jax.tree.map(
          lambda x: x + 0.01 * jnp.sign(x).astype(x.dtype), params)))
    adapter = method_from_config(ml_collections.ConfigDict(block))
    frozen, state = adapter.init(jax.random.key(0), params,
                                 calib=task.calibration({}, lambda: [batch]))
    tx = S.make_optimizer(c.optimizer, adapter, 10)
    train_state = S.init_state({'adapter': state, 'head': {}}, tx)
    new, out = jax.jit(S.make_train_step(task, adapter, tx, 0))(train_state, frozen, batch)
    assert np.isfinite(float(out['loss'])), name
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.trainable['adapter'], state)
    assert any(jax.tree.leaves(moved)), f'{name}: the step changed nothing'
