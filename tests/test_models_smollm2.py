"""Tests for the SmolLM2-135M-Instruct loader and tokenizer on the real GGUF weights: our
logits against an independent numpy forward of the file's own (permuted) Q/K with interleaved
rotary, the model's known answer, and its loss on plain English."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import llama_reference as ref
from peftjax.models import smollm2
from peftjax.models.decode import generate
from peftjax.models.llama import Llama

PROMPT = 'The capital of France is'
PARAGRAPH = (
    'The town library opens at nine in the morning and closes at six in the evening. On '
    'weekdays, most visitors come to read the newspapers, borrow books for their children or '
    'use the computers to look for work. On Saturdays the reading room is full of students '
    'preparing for their exams, and the librarians run a small club where older people learn '
    'how to write emails and make video calls to their families.')


@pytest.fixture(scope='module')
def tokenizer(smollm2_path):
  return smollm2.load_tokenizer(smollm2_path)


@pytest.fixture(scope='module')
def smollm2_path():
  return smollm2.gguf_path()  # raises with the fetch command if the asset is absent


@pytest.fixture(scope='module')
def real(smollm2_path, tokenizer):
  """(config, GGUF tensors, params, prompt ids, paragraph ids, logits of both rows)."""
  tensors = smollm2.read_tensors(smollm2_path)
  config = smollm2.read_config(smollm2_path)
  params = smollm2.convert(tensors, config)
  prompt, text = tokenizer.encode(PROMPT).ids, tokenizer.encode(PARAGRAPH).ids
  ids = np.zeros((2, len(text)), np.int32)
  ids[0, :len(prompt)], ids[1] = prompt, text
  seg = (np.arange(len(text)) < np.array([[len(prompt)], [len(text)]])).astype(np.int32)
  forward = jax.jit(functools.partial(Llama(config).apply, segment_ids=seg))
  logits = np.asarray(forward({'params': params}, ids))
  return config, tensors, params, prompt, text, logits


def test_config_comes_from_the_metadata(smollm2_path):
  c = smollm2.read_config(smollm2_path)
  assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads,
          c.intermediate_size) == (49152, 576, 30, 9, 3, 1536)
  assert c.rope_theta == 1e5 and abs(c.rms_eps - 1e-5) < 1e-9 and c.tie_embeddings
  assert c.max_length == 8192


def test_unpermute_inverts_llama_cpp_permute():
  w = np.random.default_rng(0).normal(size=(3 * 8, 5))
  np.testing.assert_array_equal(smollm2.unpermute(ref.permute(w, 3), 3), w)
  assert not np.array_equal(ref.permute(w, 3), w)


def test_logits_match_reference_on_gguf_layout(real):
  config, tensors, _, prompt, _, logits = real
  want = ref.logits(lambda name: tensors[name].astype(np.float64), config, prompt,
                    config.rms_eps)
  ours = logits[0, :len(prompt)]
  # float32 through 30 layers against float64: logits reach ~27, errors ~2e-4.
  np.testing.assert_allclose(ours, want, atol=1e-3, rtol=0)
  np.testing.assert_array_equal(ours.argmax(-1), want.argmax(-1))


def test_continues_with_paris(real, tokenizer):
  _, _, _, prompt, _, logits = real
  assert tokenizer.decode([int(logits[0, len(prompt) - 1].argmax())]) == ' Paris'


def test_english_loss_is_low(real):
  _, _, _, _, text, logits = real
  logp = jax.nn.log_softmax(logits[1, :-1].astype(np.float64))
  loss = -np.mean(np.take_along_axis(np.asarray(logp), np.array(text[1:])[:, None], -1))
  assert loss < 4.0, loss  # measured 3.29; uniform: log(49152) = 10.8


def test_generate_answers_in_a_batch(real, tokenizer):
  config, _, params, _, _, _ = real
  prompts = [PROMPT, 'The capital of Germany is the city of']
  encoded = [tokenizer.encode(p).ids for p in prompts]
  ids = np.zeros((2, max(map(len, encoded))), np.int32)
  for row, e in zip(ids, encoded):
    row[:len(e)] = e
  eos = smollm2.special_ids(smollm2.gguf_path())['eos']
  out = generate(Llama(config), params, ids, [len(e) for e in encoded], max_new_tokens=3,
                 eos_id=eos)
  texts = [tokenizer.decode(np.asarray(row).tolist()) for row in out.tokens]
  assert texts[0].startswith(' Paris.') and texts[1].startswith(' Berlin'), texts


def test_tokenizer(tokenizer, smollm2_path):
  assert smollm2.special_ids(smollm2_path) == {'bos': 1, 'eos': 2, 'pad': 2, 'unk': 0}
  assert [tokenizer.id_to_token(i) for i in range(3)] == [
      '<|endoftext|>', '<|im_start|>', '<|im_end|>']
  assert tokenizer.get_vocab_size() == 49152
  for text in (PARAGRAPH, 'In 2024, prices rose 3.5%!\n\tÇa va?  Ünïcödé ✓ 東京',
               '<|im_start|>user\nHi there<|im_end|>\n'):
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
  chat = tokenizer.encode('<|im_start|>user\nHi<|im_end|>')
  assert chat.ids[0] == 1 and chat.ids[-1] == 2 and len(chat.ids) == 5  # specials whole
  assert tokenizer.decode(chat.ids) == 'user\nHi'  # and skipped when decoding
  assert tokenizer.encode('2024').tokens == ['2', '0', '2', '4']  # digits one by one
  assert tokenizer.encode(PROMPT).tokens == ['The', 'Ġcapital', 'Ġof', 'ĠFrance', 'Ġis']  # no BOS
  padded = smollm2.load_tokenizer(smollm2_path)
  padded.enable_padding(length=8)
  assert len(padded.encode('a').ids) == 8
  assert len(smollm2.load_tokenizer(smollm2_path).encode('a').ids) == 1  # a fresh copy
