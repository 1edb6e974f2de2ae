"""Masks and grouped-query attention against a per-head numpy loop."""
import jax
import numpy as np

from peftjax.models import attention


def _reference(q, k, v, mask, bias, scale):
  b, lq, h, d = q.shape
  group = h // k.shape[2]
  out = np.zeros_like(q)
  for i in range(b):
    for j in range(h):
      s = q[i, :, j] @ k[i, :, j // group].T * scale + bias[0, j]
      s = np.where(mask[i, 0], s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p = np.nan_to_num(p / p.sum(-1, keepdims=True))
      out[i, :, j] = p @ v[i, :, j // group]
  return out


def test_grouped_query_attention_matches_per_head_loop():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
  k, v = (rng.normal(size=(2, 7, 2, 4)).astype(np.float32) for _ in range(2))
  bias = rng.normal(size=(1, 6, 5, 7)).astype(np.float32)
  mask = rng.random((2, 1, 5, 7)) > 0.3
  mask[1, 0, 2] = False  # a query with no allowed key gives zeros
  got = attention.attend(q, k, v, mask, bias=bias, scale=0.7)
  np.testing.assert_allclose(got, _reference(q, k, v, mask, bias, 0.7), atol=1e-5)
  assert np.all(np.asarray(got)[1, 2] == 0)


def test_prefix_lm_mask_with_packing():
  # Row: example 1 = prefix of 2 + 2 targets, example 2 = prefix of 1 + 1 target, 1 pad.
  seg = np.array([[1, 1, 1, 1, 2, 2, 0]])
  prefix = np.array([[1, 1, 0, 0, 1, 0, 0]], bool)
  m = np.asarray(attention.make_mask(seg, causal=True, prefix=prefix))[0, 0]
  want = np.zeros((7, 7), bool)
  want[0, :2] = want[1, :2] = True          # prefix: bidirectional within the prefix
  want[2, :3] = True; want[3, :4] = True    # targets: causal over prefix and earlier targets
  want[4, 4] = True; want[5, 4:6] = True    # second example sees nothing of the first
  np.testing.assert_array_equal(m, want)
  causal = np.asarray(attention.make_mask(seg, causal=True))[0, 0]
  assert not causal[0, 1] and causal[1, 0]
  cross = np.asarray(attention.make_mask(np.array([[1, 2]]), causal=False,
                                         kv_segment_ids=seg))[0, 0]
  np.testing.assert_array_equal(cross, [seg[0] == 1, seg[0] == 2])
