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
(dense masked weights inside chunks of `chunk_size`, a scan carrying (m, u, w)
across chunks: matmuls for the accelerator) and the recurrent cell used for
decoding with a state of constant size. Padding (position -1) adds nothing.
"""
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.documents import PAD_DOCUMENT
from layers.linear import Dense

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
  """(m, u, w) ⊕ (m, u, w) of eq. 5-6, safe when both maxima are -inf."""
  m = jnp.maximum(a[0], b[0])
  scale_a = jnp.where(jnp.isneginf(a[0]), 0.0, jnp.exp(a[0] - m))
  scale_b = jnp.where(jnp.isneginf(b[0]), 0.0, jnp.exp(b[0] - m))
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


def aaren_chunked(scores: jax.Array, values: jax.Array, documents: jax.Array, state: AarenState,
                  chunk_size: int) -> tuple[jax.Array, AarenState]:
  """Dense inside chunks, a scan across them. Same shapes as aaren_scan."""
  batch, length, heads = scores.shape
  pad = -length % chunk_size
  if pad:
    scores = jnp.pad(scores, ((0, 0), (0, pad), (0, 0)))
    values = jnp.pad(values, ((0, 0), (0, pad), (0, 0), (0, 0)))
    documents = jnp.pad(documents, ((0, 0), (0, pad)), constant_values=PAD_DOCUMENT)
  chunks = (length + pad) // chunk_size
  split = lambda x: jnp.moveaxis(x.reshape(batch, chunks, chunk_size, *x.shape[2:]), 1, 0)
  causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))

  def one_chunk(carry: AarenState, inputs):
    s, v, doc = inputs                                       # [B, C, H], [B, C, H, D], [B, C]
    m_leaf, u_leaf, v_leaf = _leaves(s, v, doc)
    visible = causal & (doc[:, :, None] == doc[:, None, :]) & (doc[:, None, :] >= 0)   # [B, Ct, Cj]
    from_carry = (doc == carry.document[:, None]) & (doc >= 0)                          # [B, C]
    scores_tj = jnp.where(visible[:, :, :, None], m_leaf[:, None, :, :], -jnp.inf)    # [B, Ct, Cj, H]
    carry_m = jnp.where(from_carry[:, :, None], carry.m[:, None], -jnp.inf)            # [B, C, H]
    m = jnp.maximum(jnp.max(scores_tj, axis=2), carry_m)                                # [B, C, H]
    safe_m = jnp.where(jnp.isneginf(m), 0.0, m)
    weights = jnp.where(jnp.isneginf(scores_tj), 0.0, jnp.exp(scores_tj - safe_m[:, :, None]))  # [B, Ct, Cj, H]
    carry_scale = jnp.where(jnp.isneginf(carry_m), 0.0, jnp.exp(carry_m - safe_m))     # [B, C, H]
    u = jnp.einsum('btjh,bjh->bth', weights, u_leaf) + carry_scale * carry.u[:, None]
    w = jnp.einsum('btjh,bjhd->bthd', weights, v_leaf) + carry_scale[..., None] * carry.w[:, None]
    # The state after the chunk is the one at its last real token (padding passes it on).
    real = doc >= 0
    last = jnp.max(jnp.where(real, jnp.arange(chunk_size), -1), axis=1)          # [B], -1: no real token
    at_last = lambda x: jnp.take_along_axis(x, jnp.maximum(last, 0).reshape(-1, *[1] * (x.ndim - 1)), 1)[:, 0]
    new_carry = AarenState(m=at_last(m), u=at_last(u), w=at_last(w), document=at_last(doc))
    empty = last < 0
    new_carry = jax.tree.map(lambda old, new: jnp.where(empty.reshape(-1, *[1] * (new.ndim - 1)), old, new),
                             carry, new_carry)
    return new_carry, _output(u, w)

  state, out = jax.lax.scan(one_chunk, state, (split(scores), split(values), split(documents)))
  out = jnp.moveaxis(out, 0, 1).reshape(batch, chunks * chunk_size, heads, -1)[:, :length]
  return out, state


class Aaren(nnx.Module):
  """Multi-head Aaren mixer: a drop-in for self-attention in a residual block."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, impl: str = 'chunked', chunk_size: int = 64,
               out_init_scale: float = 1.0, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    if impl not in IMPLEMENTATIONS:
      raise ValueError(f'unknown aaren impl {impl!r}; known: {IMPLEMENTATIONS}')
    self.num_heads, self.head_dim, self.impl, self.chunk_size = num_heads, head_dim, impl, chunk_size
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    query_init = sharding.partitioned(nnx.initializers.normal(1.0), (sharding.HEADS, sharding.HEAD_DIM))
    self.query = nnx.Param(query_init(rngs.params(), (num_heads, head_dim), param_dtype))
    self.key = Dense(dim, (num_heads, head_dim), names=(sharding.EMBED, sharding.HEADS, sharding.HEAD_DIM), **common)
    self.value = Dense(dim, (num_heads, head_dim), names=(sharding.EMBED, sharding.HEADS, sharding.HEAD_DIM),
                       **common)
    self.out = Dense((num_heads, head_dim), dim, names=(sharding.HEADS, sharding.HEAD_DIM, sharding.EMBED),
                     init_scale=out_init_scale, **common)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> AarenState:
    del max_len, dtype  # constant size, always float32
    return AarenState.create(batch, self.num_heads, self.head_dim)

  def __call__(self, x: jax.Array, positions: jax.Array, token_index: jax.Array, documents: jax.Array,
               cache: AarenState | None = None) -> tuple[jax.Array, AarenState | None]:
    """x [B, T, D] -> y [B, T, D], updated state (the signature of layers.attention.Attention)."""
    del positions, token_index
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
