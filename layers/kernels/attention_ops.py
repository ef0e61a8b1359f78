"""Scaled dot-product attention with causal, sliding-window and document masks.

softmax(q k^T * scale + mask) v (Vaswani et al. 2017, eq. 1) for MHA, GQA and
MQA (query heads grouped over `num_kv_heads`). Query i sees key j when both are
in the same document, j <= i and i - j < window (W keys including itself: the
Mistral / YOCO convention, flash-attn `window_size=(W-1, 0)`).

Three implementations behind `impl`: `xla` (the reference, runs everywhere;
`attend_visible` builds the scores in blocks of queries once they would pass
DENSE_SCORES_LIMIT elements, so a long prefill never holds a [T, S] array),
`cudnn` (cuDNN flash attention on GPU, bf16/fp16 only; the window always goes
with `is_causal=True`, since without it some cuDNN versions attend to the
future) and `splash` (the TPU splash kernel, layers/kernels/splash_attention.py; Pallas
interpret mode elsewhere). The kernels serve self-attention over the queries'
own row (`self_attention`); with a KV cache or other keys the XLA form runs.
`auto` picks cuDNN when compiling for a GPU and splash when compiling for a TPU
(kernel_sharding.compile_platform: the active mesh's devices), where they
apply, and XLA otherwise. Which of the two a call takes is decided in one
place, `choose_path`, from how its keys relate to its queries (`Keys.own`,
layers/blocks/shared_keys.py); `attend` is that choice for keys and values as given.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp

from layers import sharding
from layers.blocks.shared_keys import AFTER_CACHED, OWN, VISIBLE, Keys
from layers.documents import PAD_DOCUMENT, Segments
from layers.kernels import kernel_sharding, splash_attention

IMPLEMENTATIONS = ('xla', 'cudnn', 'splash', 'auto')
_MASKED = -1e30  # finite, so a fully masked (padding) query gives a finite output
CUDNN_MAX_DOCUMENTS = 16  # runs of one document id per row that the packed cuDNN call describes
# Scores (B x heads x queries x keys) above which the XLA form works through the queries in blocks
# of at most BLOCK_SCORES scores each: O(block x S) memory, never [T, S] for a long prompt.
DENSE_SCORES_LIMIT = 1 << 30
BLOCK_SCORES = 1 << 28


def visibility_mask(q_index: jax.Array, q_document: jax.Array, k_index: jax.Array,
                    k_document: jax.Array, window: int | None) -> jax.Array:
  """[B, T] queries x [B, S] keys -> bool [B, T, S]: key visible to query."""
  same_document = (q_document[:, :, None] == k_document[:, None, :]) & (k_document[:, None, :] >= 0)
  offset = q_index[:, :, None] - k_index[:, None, :]  # [B, T, S]
  visible = same_document & (offset >= 0)
  if window is not None:
    visible &= offset < window
  return visible


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  scale: float) -> jax.Array:
  """q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] -> [B, T, N, H]; softmax in float32."""
  batch, length, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  q = q.reshape(batch, length, num_kv, num_heads // num_kv, head_dim)  # [B, T, K, G, H]
  logits = jnp.einsum('btkgh,bskh->bkgts', q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, None, None], logits, _MASKED)  # [B, K, G, T, S]
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskh->btkgh', probs, v)
  return out.reshape(batch, length, num_heads, head_dim)


def attend_visible(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array, q_document: jax.Array,
                   k_index: jax.Array, k_document: jax.Array, window: int | None, scale: float) -> jax.Array:
  """xla_attention with the visibility mask of these queries and keys, built block by block when large.

  q [B, T, N, H], k/v [B, S, K, H], index/document [B, T] and [B, S] -> [B, T, N, H]. Up to
  DENSE_SCORES_LIMIT scores in one piece; beyond, the queries go in blocks (lax.map) of a power of
  two holding at most BLOCK_SCORES scores, the last block padded with queries that see nothing.
  """
  batch, length, num_heads, head_dim = q.shape
  keys = k.shape[1]
  if batch * num_heads * length * keys <= DENSE_SCORES_LIMIT:
    mask = visibility_mask(q_index, q_document, k_index, k_document, window)
    return xla_attention(q, k, v, mask, scale)
  block = 1 << max(0, (BLOCK_SCORES // (batch * num_heads * keys)).bit_length() - 1)
  blocks = -(-length // block)
  pad = blocks * block - length

  def split(x: jax.Array, fill) -> jax.Array:  # [B, T, ...] -> [blocks, B, block, ...]
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(batch, blocks, block, *x.shape[2:]), 1, 0)

  def one_block(inputs):
    q_block, index_block, document_block = inputs
    mask = visibility_mask(index_block, document_block, k_index, k_document, window)
    return xla_attention(q_block, k, v, mask, scale)

  out = jax.lax.map(one_block, (split(q, 0), split(q_index, 0), split(q_document, PAD_DOCUMENT)))
  return jnp.moveaxis(out, 0, 1).reshape(batch, blocks * block, num_heads, head_dim)[:, :length]


def document_segments(documents: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """documents [B, T] -> cuDNN's packed layout of each row's runs of one id (a document, or padding):
  lengths [B, M] and starts [B, M + 1], -1 past the row's last run; and the number of runs [B].
  Only the first M runs are described; a row with more needs another path."""
  batch, length = documents.shape
  is_start = jnp.concatenate([jnp.ones((batch, 1), bool), documents[:, 1:] != documents[:, :-1]], axis=1)  # [B, T]
  starts = jax.vmap(lambda row: jnp.nonzero(row, size=max_segments, fill_value=length)[0])(is_start)  # [B, M]
  ends = jnp.concatenate([starts[:, 1:], jnp.full((batch, 1), length, starts.dtype)], axis=1)     # [B, M]
  present = starts < length
  lengths = jnp.where(present, ends - starts, -1)
  starts = jnp.concatenate([jnp.where(present, starts, -1), jnp.full((batch, 1), -1, starts.dtype)], axis=1)
  return lengths.astype(jnp.int32), starts.astype(jnp.int32), is_start.sum(axis=1)


def cudnn_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, documents: jax.Array,
                         window: int | None, scale: float) -> jax.Array:
  """Causal self-attention over one packed row with cuDNN (GPU, bf16/fp16).

  Each run of one document id is a segment of cuDNN's packed (ragged) layout, so key
  blocks of other documents are skipped, not masked (faster than the dense document
  mask, which blocks no work; measured in docs/performance.md). Padding runs attend
  among themselves; real tokens never see them, as in the XLA form (padding outputs
  differ, never used). A window is cuDNN's sliding_window_length (W keys including
  itself). A row of more than CUDNN_MAX_DOCUMENTS runs takes the dense document mask
  instead (lax.cond, on device).

  Keys and values are repeated to the query heads (GQA/MQA): JAX's packed call computes
  the K/V offsets with the query heads' count (read in JAX 0.10.2). Under a mesh each
  device attends over its own rows and query heads (jax.shard_map): XLA's partitioning
  of the packed call over the batch gives wrong gradients (flat FSDP loss curves on
  2 H200s) and refuses K/V sharded unlike Q.
  """
  batch, length, num_heads, _ = q.shape
  window = window if window is not None and window < length else None
  k, v = (jnp.repeat(x, num_heads // x.shape[2], axis=2) for x in (k, v))  # [B, T, N, H]

  def attend(q, k, v, documents):  # one device's rows [b, T] and query heads [n]
    def dense_mask():
      same_document = (documents[:, :, None] == documents[:, None, :]) & (documents[:, None, :] >= 0)
      return jax.nn.dot_product_attention(
          q, k, v, mask=same_document[:, None], scale=scale, is_causal=True,
          local_window_size=None if window is None else (window - 1, 0), implementation='cudnn')

    def blocked_xla():  # a [b, T, T] mask would not fit (a long prefill): queries in blocks
      index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), documents.shape)
      return attend_visible(q, k, v, index, documents, index, documents, window, scale)

    def packed():
      # cuDNN's packed layout is not in jax.nn.dot_product_attention's API; imported here, so
      # that a JAX which moves this private module breaks only this GPU path.
      from jax._src.cudnn import fused_attention_stablehlo as cudnn_fused_attention
      return cudnn_fused_attention.dot_product_attention(
          q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=starts, kv_offsets=starts, scale=scale,
          mask_type=cudnn_fused_attention.MaskType.CAUSAL, sliding_window_length=window)

    lengths, starts, runs = document_segments(documents, CUDNN_MAX_DOCUMENTS)
    # Rematerialised, so the branch not taken leaves no [b, 1, T, T] mask among the residuals.
    fallback = dense_mask if q.shape[0] * length * length <= DENSE_SCORES_LIMIT else blocked_xla
    return jax.lax.cond(jnp.all(runs <= CUDNN_MAX_DOCUMENTS), packed, jax.checkpoint(fallback))

  rows = kernel_sharding.mesh_axes(sharding.ACT_BATCH, batch)
  heads = kernel_sharding.spec((rows, (), kernel_sharding.mesh_axes(sharding.ACT_HEADS, num_heads), ()))
  row_documents = kernel_sharding.spec((rows, ()))
  return kernel_sharding.run_sharded(attend, (q, k, v, documents), (heads, heads, heads, row_documents), heads)


def cudnn_supported(dtype: jnp.dtype, head_dim: int) -> bool:
  return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 256


def resolve_impl(impl: str, dtype: jnp.dtype, head_dim: int, length: int | None = None) -> str:
  """Turns `auto` into `cudnn`, `splash` or `xla` for the platform compiled for; checks an explicit choice.

  `length`: the row length when the keys are exactly the queries' row (self-attention
  without a cache), the only case splash serves; None elsewhere.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'unknown attention impl {impl!r}; known: {IMPLEMENTATIONS}')
  splash_problem = splash_attention.unsupported(length)
  if impl == 'auto':
    platform = kernel_sharding.compile_platform()
    if platform == 'gpu' and cudnn_supported(dtype, head_dim):
      return 'cudnn'
    return 'splash' if platform == 'tpu' and splash_problem is None else 'xla'
  if impl == 'cudnn' and not cudnn_supported(dtype, head_dim):
    raise ValueError('cuDNN attention needs bf16/fp16 and head_dim % 8 == 0 (<= 256); '
                     f'got {jnp.dtype(dtype).name}, {head_dim}')
  if impl == 'splash' and splash_problem:
    raise ValueError(f'splash attention cannot serve this call: {splash_problem}; use impl=\'auto\' or \'xla\'')
  return impl


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, token_index: jax.Array, documents: jax.Array,
                   window: int | None, scale: float, impl: str) -> jax.Array:
  """q [B, T, N, H], k/v [B, T, K, H] of one packed row's tokens, token_index/documents [B, T] -> [B, T, N, H]."""
  impl = resolve_impl(impl, q.dtype, q.shape[-1], q.shape[1])
  if impl == 'cudnn':
    return cudnn_self_attention(q, k, v, documents, window, scale)
  if impl == 'splash':
    return splash_attention.splash_self_attention(q, k, v, documents, window, scale)
  return attend_visible(q, k, v, token_index, documents, token_index, documents, window, scale)


def continues_earlier(earlier_document: jax.Array, documents: jax.Array) -> jax.Array:
  """bool []: some earlier key (documents [B, S]) is of the document a row's first real query (documents
  [B, T]) is in. Only a row's first document can continue from earlier keys (later ones start among the
  queries), so when this is False no earlier key is visible to any query."""
  first = jnp.min(jnp.where(documents >= 0, documents, jnp.iinfo(jnp.int32).max), axis=1)  # [B]
  return jnp.any(earlier_document == first[:, None])


def choose_path(own_tokens: Callable[[], jax.Array], other: Callable[[], jax.Array], own: str,
                earlier_document: jax.Array | None, documents: jax.Array) -> jax.Array:
  """The one choice of path for attention whose keys relate to its queries as `own` (layers/blocks/shared_keys.py):
  OWN -> own_tokens() (self-attention over the queries' tokens: the training kernels serve);
  AFTER_CACHED -> other() if some earlier key (`earlier_document` [B, S]) continues a query's document, else
  own_tokens() (a prompt into an empty cache, or one that starts a document), decided on device (lax.cond);
  VISIBLE -> other() (every key through the visibility mask)."""
  if own == OWN:
    return own_tokens()
  if own == AFTER_CACHED:
    return jax.lax.cond(continues_earlier(earlier_document, documents), other, own_tokens)
  if own != VISIBLE:
    raise ValueError(f'unknown relation of keys to queries {own!r}; known: {(OWN, AFTER_CACHED, VISIBLE)}')
  return other()


def attend(q: jax.Array, queries: Segments, keys: Keys, window: int | None, scale: float, impl: str) -> jax.Array:
  """softmax(q k^T * scale + mask) v of queries q [B, T, N, H] at `queries` over `keys` ([B, S, K, H]) on the
  path `choose_path` picks: `self_attention` (kernel `impl`) over the queries' own tokens, the last T keys,
  or `attend_visible` over every key. -> [B, T, N, H]."""
  length = q.shape[1]

  def own_tokens() -> jax.Array:
    return self_attention(q, keys.keys[:, -length:], keys.values[:, -length:], queries.index, queries.document,
                          window, scale, impl)

  def visible() -> jax.Array:
    return attend_visible(q, keys.keys, keys.values, queries.index, queries.document, keys.index, keys.document,
                          window, scale)

  return choose_path(own_tokens, visible, keys.own, keys.document[:, :-length], queries.document)
