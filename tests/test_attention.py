"""Attention: sliding window == full attention with a banded mask; documents and
padding are never crossed; implementation switch errors are clear; the kernel path
is chosen from how the keys relate to the queries."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.blocks.rope import apply_rope
from layers.blocks.shared_keys import AFTER_CACHED, OWN, VISIBLE, Keys
from layers.documents import Segments, locate
from layers.kernels import attention_ops
from layers.mixers.attention import Attention
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


def test_choose_path_serves_own_tokens_unless_an_earlier_key_continues_a_query_document():
  """attention_ops.choose_path, the one choice of kernel path (layers/blocks/shared_keys.py): OWN and VISIBLE are
  static; AFTER_CACHED takes the queries' own tokens unless an earlier key is of a query's first document,
  and `attend` gives the visible-mask result either way."""
  own, other = (lambda: jnp.zeros(())), (lambda: jnp.ones(()))
  queries = jnp.asarray([[3, 3, 4]])  # the row's first real query is in document 3
  assert attention_ops.choose_path(own, other, OWN, None, queries) == 0
  assert attention_ops.choose_path(own, other, VISIBLE, None, queries) == 1
  assert attention_ops.choose_path(own, other, AFTER_CACHED, jnp.asarray([[2, -1]]), queries) == 0
  assert attention_ops.choose_path(own, other, AFTER_CACHED, jnp.asarray([[2, 3]]), queries) == 1
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, n, HEADS, HEAD_DIM)), jnp.float32) for n in (3, 5, 5))
  k, v = k[:, :, :KV_HEADS], v[:, :, :KV_HEADS]
  # Two cached slots, then the three queries' tokens (document 1): the slots empty, or earlier tokens of document 1.
  for slot_index, slot_document, first in (([-1, -1], [-1, -1], 0), ([0, 1], [1, 1], 2)):
    queries_at = Segments(positions=jnp.asarray([[0, 1, 2]]) + first, index=jnp.asarray([[0, 1, 2]]) + first,
                          document=jnp.ones((1, 3), jnp.int32))
    keys = Keys(k, v, jnp.concatenate([jnp.asarray([slot_index]), queries_at.index], axis=1),
                jnp.concatenate([jnp.asarray([slot_document]), queries_at.document], axis=1), own=AFTER_CACHED)
    expected = attention_ops.attend_visible(q, k, v, queries_at.index, queries_at.document, keys.index,
                                            keys.document, None, HEAD_DIM ** -0.5)
    np.testing.assert_allclose(attention_ops.attend(q, queries_at, keys, None, HEAD_DIM ** -0.5, 'xla'), expected,
                               atol=1e-6)
