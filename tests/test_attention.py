"""Attention: sliding window == full attention with a banded mask; documents and
padding are never crossed; implementation switch errors are clear."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import attention_ops
from layers.attention import Attention
from layers.documents import locate
from layers.rope import apply_rope
from tests.helpers import packed_positions

DIM, HEADS, KV_HEADS, HEAD_DIM = 16, 4, 2, 8
LENGTHS = [[5, 9, 4], [18]]  # two rows of 18 tokens: three documents, then one


def reference_attention(module: Attention, x, positions, window):
  """Loop over queries; each softmaxes over the keys a banded, per-document mask allows."""
  q = np.asarray(apply_rope(module.query(x), positions, **module.rope))
  k = np.asarray(apply_rope(module.key(x), positions, **module.rope))
  v = np.asarray(module.value(x))
  documents = locate(positions)[0].document
  documents = np.asarray(documents)
  batch, length = positions.shape
  group = HEADS // KV_HEADS
  out = np.zeros_like(q)
  for b in range(batch):
    for i in range(length):
      keys = [j for j in range(length)
              if documents[b, j] == documents[b, i] and documents[b, j] >= 0 and 0 <= i - j < (window or length + 1)]
      for h in range(HEADS):
        scores = np.array([q[b, i, h] @ k[b, j, h // group] for j in keys]) / np.sqrt(HEAD_DIM)
        weights = np.exp(scores - scores.max())
        out[b, i, h] = (weights / weights.sum()) @ v[b, keys, h // group]
  return np.asarray(module.out(jnp.asarray(out)))


@pytest.mark.parametrize('window', [0, 1, 3, 8, 18, 40])  # global, below T, equal to T, above T
def test_window_equals_banded_reference_across_documents(window):
  module = Attention(DIM, HEADS, KV_HEADS, HEAD_DIM, window=window or None, rngs=nnx.Rngs(0))
  positions = packed_positions(LENGTHS)
  x = jax.random.normal(jax.random.key(1), (2, 18, DIM))
  y, _ = module(x, locate(positions)[0])
  np.testing.assert_allclose(y, reference_attention(module, x, positions, window), atol=2e-5)


def test_sliding_window_is_full_attention_with_a_band_mask():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 18, HEADS if n == 0 else KV_HEADS, HEAD_DIM)), jnp.float32)
             for n in range(3))
  segments = locate(packed_positions(LENGTHS))[0]
  index, documents = segments.index, segments.document
  i, j = np.arange(18)[:, None], np.arange(18)[None, :]
  band = jnp.asarray((i - j < 4))[None]
  windowed = attention_ops.xla_attention(q, k, v, attention_ops.visibility_mask(index, documents, index, documents, 4), 0.3)
  banded = attention_ops.xla_attention(q, k, v, attention_ops.visibility_mask(index, documents, index, documents, None) & band, 0.3)
  np.testing.assert_allclose(windowed, banded, atol=1e-6)


def test_padding_and_later_documents_do_not_change_earlier_tokens():
  module = Attention(DIM, HEADS, KV_HEADS, HEAD_DIM, window=6, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (1, 12, DIM))
  alone = packed_positions([[7]], pad_to=12)   # one document, then padding
  packed = packed_positions([[7, 5]])          # the same document, then another one
  outs = []
  for positions in (alone, packed):
    outs.append(module(x, locate(positions)[0])[0])
  np.testing.assert_allclose(outs[0][:, :7], outs[1][:, :7], atol=1e-6)
  assert np.all(np.isfinite(outs[0]))  # padded queries see nothing but stay finite


def test_impl_switch():
  assert attention_ops.resolve_impl('auto', jnp.bfloat16, 64) == ('cudnn' if jax.default_backend() == 'gpu' else 'xla')
  with pytest.raises(ValueError, match='cuDNN attention needs bf16'):
    attention_ops.resolve_impl('cudnn', jnp.float32, 64)
  with pytest.raises(ValueError, match='unknown attention impl'):
    attention_ops.resolve_impl('flash', jnp.bfloat16, 64)


def test_document_segments_describe_each_run_for_the_packed_cudnn_call():
  documents = locate(packed_positions([[3, 2, 8], [16], [1] * 16], pad_to=16))[0].document  # 3 documents + padding
  lengths, starts, runs = attention_ops.document_segments(documents, max_segments=4)
  np.testing.assert_array_equal(lengths[:2], [[3, 2, 8, 3], [16, -1, -1, -1]])
  np.testing.assert_array_equal(starts[:2], [[0, 3, 5, 13, -1], [0, -1, -1, -1, -1]])
  np.testing.assert_array_equal(runs, [4, 1, 16])  # the third row has more runs than described: dense-mask path
