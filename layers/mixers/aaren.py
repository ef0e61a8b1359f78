"""Aaren: attention as an RNN (Feng et al. 2024, "Attention as an RNN", §3).

Each head has a learned query q (not computed from the input); keys and
values are projections of the input. Output t is softmax attention of q over
the inputs 1..t of its document:

    o_t = sum_{j<=t} exp(s_j) v_j / sum_{j<=t} exp(s_j),   s_j = q . k_j / sqrt(d)

computed as a prefix scan over triples (m, u, w) = (running max, normaliser,
weighted values), leaf (s_j, 1, v_j), combine (eq. 5-6 of the paper)

    m = max(mA, mB),  u = uA e^(mA - m) + uB e^(mB - m),  w = wA e^(mA - m) + wB e^(mB - m),

and o_t = w_t / u_t. Three forms compute one function: `scan` (a segmented
jax.lax.associative_scan; a document start begins a new segment), `chunked`
(dense masked weights inside all chunks of `chunk_size` at once: matmuls for
the accelerator; then only the chunks' summaries are scanned, carrying (m, u, w)
from chunk to chunk) and the recurrent cell used for
decoding with a state of constant size. Padding (position -1) adds nothing.
"""
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.blocks.linear import Dense
from layers.documents import PAD_DOCUMENT, Segments
from layers.flops import Lengths
from layers.param_roles import QUERY, param

IMPLEMENTATIONS = ('scan', 'chunked')


@flax.struct.dataclass
class AarenState:
  """The recurrent state of one layer: (m, u, w) per head, and the document it belongs to."""
  m: jax.Array         # [B, H] float32 running max of the scores (-inf: empty)
  u: jax.Array         # [B, H] float32 sum of exp(s - m)
  w: jax.Array         # [B, H, D] float32 sum of exp(s - m) v
  document: jax.Array  # [B] int32 document of the tokens summed so far

  @classmethod
  def create(cls, batch: int, heads: int, head_dim: int) -> 'AarenState':
    return cls(m=jnp.full((batch, heads), -jnp.inf), u=jnp.zeros((batch, heads)),
               w=jnp.zeros((batch, heads, head_dim)), document=jnp.full((batch,), PAD_DOCUMENT, jnp.int32))


def _combine(a, b):
  """(m, u, w) ⊕ (m, u, w) of eq. 5-6, safe (no NaN, also in gradients) when both maxima are -inf."""
  m = jnp.maximum(a[0], b[0])
  safe_m = jnp.where(jnp.isneginf(m), 0.0, m)
  scale_a = jnp.where(jnp.isneginf(a[0]), 0.0, jnp.exp(a[0] - safe_m))
  scale_b = jnp.where(jnp.isneginf(b[0]), 0.0, jnp.exp(b[0] - safe_m))
  return m, a[1] * scale_a + b[1] * scale_b, a[2] * scale_a[..., None] + b[2] * scale_b[..., None]


def _output(u: jax.Array, w: jax.Array) -> jax.Array:
  """w / u, and 0 where nothing has been summed (padding before any token)."""
  return w / jnp.where(u > 0, u, 1.0)[..., None]


def _leaves(scores, values, documents):
  """Per-token triples; padding is the identity (-inf, 0, 0)."""
  valid = (documents >= 0)[..., None]                              # [B, T, 1]
  m = jnp.where(valid, scores, -jnp.inf)                           # [B, T, H]
  return m, valid.astype(jnp.float32) * jnp.ones_like(scores), jnp.where(valid[..., None], values, 0.0)


def aaren_scan(scores: jax.Array, values: jax.Array, documents: jax.Array,
               state: AarenState) -> tuple[jax.Array, AarenState]:
  """Segmented associative scan. scores [B, T, H], values [B, T, H, D] (float32) -> o [B, T, H, D]."""
  leaves = _leaves(scores, values, documents)
  # Document ids only grow along a row (padding is -1), so a running max is the last real document.
  seen = jax.lax.cummax(jnp.concatenate([state.document[:, None], documents], axis=1), axis=1)  # [B, T + 1]
  starts = (documents >= 0) & (documents != seen[:, :-1])

  def combine(a, b):  # segmented: a later segment start discards what came before it
    flag_a, *triple_a = a
    flag_b, *triple_b = b
    merged = _combine(triple_a, triple_b)
    keep_b = flag_b[..., None]
    return (flag_a | flag_b, jnp.where(keep_b, triple_b[0], merged[0]), jnp.where(keep_b, triple_b[1], merged[1]),
            jnp.where(keep_b[..., None], triple_b[2], merged[2]))

  # Prepend the carried state as the first element of the scan.
  first = (jnp.zeros_like(starts[:, :1]), state.m[:, None], state.u[:, None], state.w[:, None])
  elements = tuple(jnp.concatenate([f, x], axis=1) for f, x in zip(first, (starts, *leaves)))
  _, m, u, w = jax.lax.associative_scan(combine, elements, axis=1)
  m, u, w = m[:, 1:], u[:, 1:], w[:, 1:]
  new_state = AarenState(m=m[:, -1], u=u[:, -1], w=w[:, -1], document=seen[:, -1])
  return jnp.where((documents >= 0)[..., None, None], _output(u, w), 0.0), new_state


def _within_chunks(scores, values, documents):
  """Every chunk at once, from an empty state: (m, u, w) at each token. Inputs [B, n, C, ...]."""
  m_leaf, u_leaf, v_leaf = _leaves(scores, values, documents)     # [B, n, C, H], [B, n, C, H], [B, n, C, H, D]
  size = scores.shape[2]
  causal = jnp.tril(jnp.ones((size, size), bool))
  visible = causal & (documents[..., :, None] == documents[..., None, :]) & (documents[..., None, :] >= 0)
  scores_tj = jnp.where(visible[..., None], m_leaf[:, :, None], -jnp.inf)           # [B, n, Ct, Cj, H]
  m = jnp.max(scores_tj, axis=3)                                                      # [B, n, C, H]
  safe_m = jnp.where(jnp.isneginf(m), 0.0, m)
  weights = jnp.where(jnp.isneginf(scores_tj), 0.0, jnp.exp(scores_tj - safe_m[:, :, :, None]))
  u = jnp.einsum('bntjh,bnjh->bnth', weights, u_leaf)                                 # [B, n, C, H]
  w = jnp.einsum('bntjh,bnjhd->bnthd', weights, v_leaf)                               # [B, n, C, H, D]
  return m, u, w


def _entering_states(summary: AarenState, empty: jax.Array, state: AarenState) -> tuple[AarenState, AarenState]:
  """The state entering each chunk (fields [B, n, ...]) and after the last, from the chunks' own summaries.

  A chunk's summary is its (m, u, w) at its last real token, of that token's document: it
  continues the carried state if that is the same document, else replaces it.
  """
  def across(carry: AarenState, inputs):
    chunk, chunk_empty = inputs
    merged = _combine((carry.m, carry.u, carry.w), (chunk.m, chunk.u, chunk.w))
    same = chunk.document == carry.document                                          # [B]
    after = AarenState(m=jnp.where(same[:, None], merged[0], chunk.m), u=jnp.where(same[:, None], merged[1], chunk.u),
                       w=jnp.where(same[:, None, None], merged[2], chunk.w), document=chunk.document)
    after = jax.tree.map(lambda old, new: jnp.where(chunk_empty.reshape(-1, *[1] * (new.ndim - 1)), old, new),
                         carry, after)
    return after, carry

  to_time_major = lambda x: jnp.moveaxis(x, 1, 0)
  final, entering = jax.lax.scan(across, state, (jax.tree.map(to_time_major, summary), to_time_major(empty)))
  return jax.tree.map(to_time_major, entering), final


def aaren_chunked(scores: jax.Array, values: jax.Array, documents: jax.Array, state: AarenState,
                  chunk_size: int) -> tuple[jax.Array, AarenState]:
  """Dense inside all chunks at once (matmuls), then a scan over the chunks' summaries carries the
  state (a few vector ops per chunk), then each token merges the state entering its chunk. Same
  shapes as aaren_scan."""
  batch, length, heads = scores.shape
  pad = -length % chunk_size
  if pad:
    scores = jnp.pad(scores, ((0, 0), (0, pad), (0, 0)))
    values = jnp.pad(values, ((0, 0), (0, pad), (0, 0), (0, 0)))
    documents = jnp.pad(documents, ((0, 0), (0, pad)), constant_values=PAD_DOCUMENT)
  chunks = (length + pad) // chunk_size
  split = lambda x: x.reshape(batch, chunks, chunk_size, *x.shape[2:])              # [B, n, C, ...]
  scores, values, documents = split(scores), split(values), split(documents)
  m, u, w = _within_chunks(scores, values, documents)

  last = jnp.max(jnp.where(documents >= 0, jnp.arange(chunk_size), -1), axis=2)      # [B, n], -1: no real token
  at_last = lambda x: jnp.take_along_axis(
      x, jnp.maximum(last, 0).reshape(batch, chunks, 1, *[1] * (x.ndim - 3)), axis=2)[:, :, 0]
  summary = AarenState(m=at_last(m), u=at_last(u), w=at_last(w), document=at_last(documents))
  entering, final = _entering_states(summary, last < 0, state)

  from_carry = (documents == entering.document[:, :, None]) & (documents >= 0)       # [B, n, C]
  carry_m = jnp.where(from_carry[..., None], entering.m[:, :, None], -jnp.inf)       # [B, n, C, H]
  _, u, w = _combine((carry_m, entering.u[:, :, None], entering.w[:, :, None]), (m, u, w))
  out = _output(u, w).reshape(batch, chunks * chunk_size, heads, -1)[:, :length]
  return out, final


class Aaren(nnx.Module):
  """Multi-head Aaren mixer: a drop-in for self-attention in a residual block."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, impl: str = 'chunked', chunk_size: int = 64,
               out_init_scale: float = 1.0, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    if impl not in IMPLEMENTATIONS:
      raise ValueError(f'unknown aaren impl {impl!r}; known: {IMPLEMENTATIONS}')
    self.dim, self.num_heads, self.head_dim, self.impl, self.chunk_size = dim, num_heads, head_dim, impl, chunk_size
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    query_init = sharding.partitioned(nnx.initializers.normal(1.0), (sharding.HEADS, sharding.HEAD_DIM))
    self.query = param(query_init(rngs.params(), (num_heads, head_dim), param_dtype), QUERY)
    self.key = Dense(dim, (num_heads, head_dim), names=(sharding.EMBED, sharding.HEADS, sharding.HEAD_DIM), **common)
    self.value = Dense(dim, (num_heads, head_dim), names=(sharding.EMBED, sharding.HEADS, sharding.HEAD_DIM),
                       **common)
    self.out = Dense((num_heads, head_dim), dim, names=(sharding.HEADS, sharding.HEAD_DIM, sharding.EMBED),
                     init_scale=out_init_scale, **common)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> AarenState:
    del max_len, dtype  # constant size, always float32
    return AarenState.create(batch, self.num_heads, self.head_dim)

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    """Key, value, output projections and the scores; the chunked form's dense chunk work on top."""
    del doc_lengths  # the chunks are computed whole, whatever the documents
    width = self.num_heads * self.head_dim
    chunk = min(self.chunk_size, seq_len) if self.impl == 'chunked' else 1
    return 2 * self.dim * 3 * width + 2 * width + 2 * 2 * width * (chunk + 1) / 2

  def __call__(self, x: jax.Array, segments: Segments,
               cache: AarenState | None = None) -> tuple[jax.Array, AarenState | None]:
    """x [B, T, D] -> y [B, T, D], updated state (the mixer protocol, layers/blocks/residual.py)."""
    documents = segments.document
    keys = self.key(x).astype(jnp.float32)                                        # [B, T, H, D]
    values = self.value(x).astype(jnp.float32)                                    # [B, T, H, D]
    scores = jnp.einsum('bthd,hd->bth', keys, self.query[...].astype(jnp.float32)) * self.head_dim ** -0.5
    state = AarenState.create(x.shape[0], self.num_heads, self.head_dim) if cache is None else cache
    if self.impl == 'scan':
      out, state = aaren_scan(scores, values, documents, state)
    else:
      out, state = aaren_chunked(scores, values, documents, state, self.chunk_size)
    out = sharding.constrain(out.astype(x.dtype), (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_HEADS, None))
    return self.out(out), (None if cache is None else state)
