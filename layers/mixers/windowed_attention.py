"""Windowed causal attention: each window of W tokens attends to itself and the previous window.

The attention of the Block-Recurrent Transformer (Hutchins et al. 2022; docs/architectures.md,
Block-Recurrent Transformer): `WindowedAttention` is the mixer of its non-recurrent layers (and
usable alone as Transformer-XL-style attention with a memory of one window); the recurrent layer
(layers/mixers/block_recurrent.py) extends it. Window k holds the tokens of
index kW .. kW + W - 1 in the row (indices continue across cached calls, so windows do too).
Query i sees key j when both are in the same document, j <= i and
  span='sliding':  i - j < W               (the last W tokens, itself included: the codebase's
                                            sliding-window convention; meliad's causal_mask is
                                            the W tokens before the query, without itself)
  span='block':    j // W >= i // W - 1    (the whole previous window and the current one up to i)
Both masks only reach into the previous window, so a call is computed in one of two forms:
  blocked: the call's tokens laid out in whole windows (the first window completed with earlier
           tokens from the cache, the last padded); window w's W queries attend to the 2W keys of
           windows w - 1 and w: O(T * 2W) work and memory, no mask over the whole segment;
  flat:    T < W new tokens (decoding) attend to the cache's slots and to themselves.
They are one function: the same mask (from token index and document) and the same scores. A call
over its own tokens only (no cache, or a prompt continuing no cached document) goes through the
shared kernels instead (`impl`: cuDNN, splash; layers/kernels/attention_ops.py) where their mask is this
one: span='sliding' without the T5 bias.
Decode cache: a ring buffer (KVCache) of W slots ('sliding') or 2W ('block', or when the
recurrent cell reads the previous window too), token i in slot i mod slots.

meliad's attention details are switches: `qk_norm` L2-normalises queries and keys per head and
multiplies the scores by a learned per-head scale (initialised to 1, as meliad); `position='t5'`
adds a learned T5 relative position bias (per head, `num_buckets` log-spaced buckets up to
`max_distance`) instead of rotating q and k with RoPE. meliad computes (q.k + bias) * scale.
"""
import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import sharding
from layers.blocks.kv_cache import KVCache
from layers.blocks.linear import Dense
from layers.blocks.rope import apply_rope
from layers.blocks.shared_keys import AFTER_CACHED, OWN, Keys
from layers.documents import PAD_DOCUMENT, Segments
from layers.flops import Lengths, attention_flops, document_lengths, mean_visible_keys, token_offsets
from layers.kernels import attention_ops
from layers.param_roles import BIAS, NORM, param

SPANS = ('sliding', 'block')
POSITIONS = ('rope', 't5', 'none')
_MASKED = -1e30  # finite: a fully masked query row stays finite


def kernel_mask(span: str, position: str) -> bool:
  """The shared kernels' mask (layers/kernels/attention_ops.py: the last W keys, no bias) is this attention's."""
  return span == 'sliding' and position != 't5'


def visible(q_index: jax.Array, q_document: jax.Array, k_index: jax.Array, k_document: jax.Array,
            window: int, span: str) -> jax.Array:
  """[..., T] queries x [..., S] keys -> bool [..., T, S]: key visible to query."""
  qi, qd = q_index[..., :, None], q_document[..., :, None]
  ki, kd = k_index[..., None, :], k_document[..., None, :]
  seen = (qd == kd) & (kd >= 0) & (ki <= qi)
  if span == 'sliding':
    return seen & (qi - ki < window)
  return seen & (ki // window >= qi // window - 1)


def t5_bucket(distance: jax.Array, num_buckets: int, max_distance: int) -> jax.Array:
  """Causal T5 bucket of a query-key distance (q - k >= 0): exact below num_buckets/2, then log-spaced."""
  n = jnp.maximum(distance, 0)
  exact = num_buckets // 2
  log_ratio = jnp.log(n.astype(jnp.float32) / exact + np.finfo(np.float32).eps) / math.log(max_distance / exact)
  large = jnp.minimum(exact + (log_ratio * (num_buckets - exact)).astype(jnp.int32), num_buckets - 1)
  return jnp.where(n < exact, n, large)


def l2_normalise(x: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale,
           bias: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T * scale + bias) v with a mask; softmax in float32.

  q [..., T, N, H], k/v [..., S, K, H] (N a multiple of K: GQA), mask bool [..., T, S] or None,
  scale a float or per-head [N], bias [..., N, T, S] or None -> [..., T, N, H].
  """
  *lead, length, num_heads, head_dim = q.shape
  num_kv = k.shape[-2]
  group = num_heads // num_kv
  q = q.reshape(*lead, length, num_kv, group, head_dim)
  logits = jnp.einsum('...tkgh,...skh->...kgts', q, k, preferred_element_type=jnp.float32)
  scale = jnp.asarray(scale, jnp.float32)
  logits = logits * (scale.reshape(num_kv, group, 1, 1) if scale.ndim else scale)
  if bias is not None:
    logits = logits + bias.reshape(*bias.shape[:-3], num_kv, group, *bias.shape[-2:]).astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask[..., None, None, :, :], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('...kgts,...skh->...tkgh', probs, v)
  return out.reshape(*out.shape[:-3], num_heads, head_dim)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a call's T tokens sit when laid out in whole windows (the blocked form).

  Padded position p holds token index `index[:, p]`; the new tokens sit at p = offset .. offset+T-1,
  positions before them hold the current window's earlier tokens (from the cache), positions after
  them are empty. Without a cache the call starts at index 0, so the offset is 0 statically. The
  rows of a batch advance together (locate gives every row the same token index), so one offset
  serves the batch: slices instead of gathers.
  """
  window: int
  length: int                 # T
  num_windows: int
  offset: jax.Array | None    # int32 scalar; None: 0 (no cache)
  index: jax.Array            # [B, P] int32

  @classmethod
  def build(cls, token_index: jax.Array, window: int, cached: bool) -> 'Layout':
    length = token_index.shape[1]
    if not cached:
      num_windows = -(-length // window)
      offset = None
    else:  # the call may start anywhere inside a window
      num_windows = -(-(length + window - 1) // window)
      offset = token_index[0, 0] % window
    start = token_index[:, :1] - (0 if offset is None else offset)
    return cls(window, length, num_windows, offset, start + jnp.arange(num_windows * window, dtype=jnp.int32))

  @property
  def padded(self) -> int:
    return self.num_windows * self.window

  def previous_index(self) -> jax.Array:
    """[B, W]: indices of the window before the first one."""
    return self.index[:, :1] - self.window + jnp.arange(self.window, dtype=jnp.int32)

  def complete(self) -> jax.Array:
    """bool [B, num_windows]: the call reaches the window's last token (so the window is whole)."""
    ends = (jnp.arange(self.num_windows) + 1) * self.window
    seen = self.length + (0 if self.offset is None else self.offset)
    return jnp.broadcast_to(ends <= seen, (self.index.shape[0], self.num_windows))

  def place(self, new: jax.Array, earlier: jax.Array | None = None, fill=0) -> jax.Array:
    """new [B, T, ...] -> [B, P, ...]: the new tokens at their places, `earlier` [B, P, ...] (or
    `fill`) before them, `fill` after them."""
    pad = self.padded - self.length
    if self.offset is None:
      return jnp.pad(new, [(0, 0), (0, pad)] + [(0, 0)] * (new.ndim - 2), constant_values=fill)
    if earlier is None:
      base = jnp.full((new.shape[0], self.padded, *new.shape[2:]), fill, new.dtype)
    else:
      before = (jnp.arange(self.padded) < self.offset).reshape((1, -1) + (1,) * (new.ndim - 2))
      base = jnp.where(before, earlier.astype(new.dtype), jnp.asarray(fill, new.dtype))
    return jax.lax.dynamic_update_slice_in_dim(base, new, self.offset, axis=1)

  def take(self, padded: jax.Array) -> jax.Array:
    """[B, P, ...] -> the new tokens' entries [B, T, ...]."""
    if self.offset is None:
      return padded[:, :self.length]
    return jax.lax.dynamic_slice_in_dim(padded, self.offset, self.length, axis=1)

  def windows(self, x: jax.Array) -> jax.Array:
    """[B, P, ...] -> [B, num_windows, W, ...]."""
    return x.reshape(x.shape[0], self.num_windows, self.window, *x.shape[2:])

  def with_previous(self, x: jax.Array, previous: jax.Array) -> jax.Array:
    """[B, P, ...] and the window before them [B, W, ...] -> [B, num_windows, 2W, ...]: each window's
    previous window, then itself."""
    cur = self.windows(x)
    prev = jnp.concatenate([previous[:, None], cur[:, :-1]], axis=1)
    return jnp.concatenate([prev, cur], axis=2)


def from_ring(cache: KVCache, wanted: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Keys, values and documents of tokens `wanted` [B, M] (the same in every row) from the ring;
  document -1 where the slot now holds another token."""
  slots = wanted[0] % cache.num_slots  # [M]
  found = (cache.slot_index[:, slots] == wanted) & (wanted >= 0)
  document = jnp.where(found, cache.slot_document[:, slots], PAD_DOCUMENT)
  return cache.keys[:, slots], cache.values[:, slots], document


@dataclasses.dataclass(frozen=True)
class WindowKeys:
  """Keys and values of the padded layout (blocked form), with their index and document, and the window
  before the first one (a flat call's keys are layers/blocks/shared_keys.Keys)."""
  k: jax.Array         # [B, P, K, H]
  v: jax.Array
  index: jax.Array     # [B, P]
  document: jax.Array  # [B, P]
  prev_k: jax.Array    # [B, W, K, H]: the window before the first one
  prev_v: jax.Array
  prev_document: jax.Array  # [B, W]


def layout_keys(layout: Layout, k: jax.Array, v: jax.Array, documents: jax.Array,
                cache: KVCache | None) -> WindowKeys:
  """The new keys/values placed in whole windows, completed from the cache (blocked form)."""
  batch, window = k.shape[0], layout.window
  if cache is None:
    earlier = (None, None, None)
    prev_k = jnp.zeros((batch, window, *k.shape[2:]), k.dtype)
    prev = (prev_k, prev_k, jnp.full((batch, window), PAD_DOCUMENT, jnp.int32))
  else:
    earlier = from_ring(cache, layout.index)
    prev = from_ring(cache, layout.previous_index())
  return WindowKeys(
      k=layout.place(k, None if earlier[0] is None else earlier[0].astype(k.dtype)),
      v=layout.place(v, None if earlier[1] is None else earlier[1].astype(v.dtype)),
      index=layout.index,
      document=layout.place(documents, earlier[2], fill=PAD_DOCUMENT),
      prev_k=prev[0].astype(k.dtype), prev_v=prev[1].astype(v.dtype), prev_document=prev[2])


@dataclasses.dataclass(frozen=True)
class Blocked:
  """The keys a blocked call attended: its layout and the keys laid out in it."""
  layout: Layout
  keys: WindowKeys


class WindowedAttention(nnx.Module):
  """The windowed self-attention mixer (layers/blocks/residual.py): x [B, T, D] -> y = o W_o, where
  o = softmax(q k^T * scale + bias) v over the keys `visible` lets each query see, q, k, v = x W_q,
  x W_k, x W_v (RoPE-rotated, or with a T5 bias). The projections, position encoding and the
  blocked and flat forms are shared with the block-recurrent layer (layers/mixers/block_recurrent.py).

  `impl` (layers/kernels/attention_ops.IMPLEMENTATIONS) is the kernel for a call's self-attention over its
  own tokens (no cache, or a prompt continuing no cached document): cuDNN or splash serve
  span='sliding' without the T5 bias (their window mask is exactly `visible`'s), under qk_norm with
  the per-head scale folded into q; elsewhere, and for impl 'xla', the blocked form runs.
  """

  # How many [N, H] results the output projection reads: the self-attention (a subclass adds its own).
  reads: ClassVar[int] = 1

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *, window: int,
               span: str = 'sliding', position: str = 'rope', qk_norm: bool = False, rope_base: float = 10000.0,
               num_buckets: int = 32, max_distance: int = 128, impl: str = 'xla', out_init_scale: float = 1.0,
               dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if span not in SPANS:
      raise ValueError(f'unknown window span {span!r}; known: {SPANS}')
    if position not in POSITIONS:
      raise ValueError(f'unknown position encoding {position!r}; known: {POSITIONS}')
    if num_heads % num_kv_heads:
      raise ValueError(f'num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}')
    if impl not in attention_ops.IMPLEMENTATIONS:
      raise ValueError(f'unknown attention impl {impl!r}; known: {attention_ops.IMPLEMENTATIONS}')
    if impl in ('cudnn', 'splash') and not kernel_mask(span, position):
      raise ValueError(f'attention impl {impl!r} needs span=\'sliding\' and no T5 bias '
                       f'(got span={span!r}, position={position!r})')
    self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
    self.window, self.span, self.position, self.qk_norm = window, span, position, qk_norm
    self.rope_base, self.num_buckets, self.max_distance, self.impl = rope_base, num_buckets, max_distance, impl
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    q_names = (sharding.EMBED, sharding.HEADS, sharding.HEAD_DIM)
    kv_names = (sharding.EMBED, sharding.KV_HEADS, sharding.HEAD_DIM)
    self.query = Dense(dim, (num_heads, head_dim), names=q_names, **common)
    self.key = Dense(dim, (num_kv_heads, head_dim), names=kv_names, **common)
    self.value = Dense(dim, (num_kv_heads, head_dim), names=kv_names, **common)
    ones = sharding.partitioned(nnx.initializers.ones, (sharding.HEADS,))
    self.scale = param(ones(None, (num_heads,), param_dtype), NORM) if qk_norm else None
    if position == 't5':
      init = sharding.partitioned(nnx.initializers.normal(num_heads ** -0.5), (None, sharding.HEADS))
      self.relative_bias = param(init(rngs.params(), (num_buckets, num_heads), param_dtype), BIAS)
    else:
      self.relative_bias = None
    in_shape, in_names = (num_heads, head_dim), (sharding.HEADS, sharding.HEAD_DIM)
    if self.reads > 1:
      in_shape, in_names = (self.reads, *in_shape), (None, *in_names)
    self.out = Dense(in_shape, dim, names=(*in_names, sharding.EMBED), init_scale=out_init_scale, **common)

  # -- the mixer -------------------------------------------------------------------------------

  def __call__(self, x: jax.Array, segments: Segments,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """x [B, T, D] -> y [B, T, D], the cache with this call's keys written (None without one)."""
    q, k, v = self.project(x, segments.positions)
    o, _ = self.attend_tokens(q, k, v, segments, cache)  # [B, T, N, H]
    y = self.out(o)
    return y, (None if cache is None else cache.write(k, v, segments.index, segments.document))

  def cache_slots(self) -> int:
    return self.window * (2 if self.span == 'block' else 1)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> KVCache:
    """A ring of the last window of keys (two with span='block'), whatever `max_len`."""
    return KVCache.create(batch, self.cache_slots(), self.num_kv_heads, self.head_dim, dtype)

  def visible_keys(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    """The mean number of keys a query sees, within its document; 'block' windows are aligned to
    the row's token index (documents laid end to end, rows of seq_len)."""
    lengths = document_lengths(seq_len, doc_lengths)
    if self.span == 'sliding':
      return mean_visible_keys(lengths, self.window)
    offset = token_offsets(lengths)  # index in the document
    index = offset if np.ndim(lengths) == 0 else np.arange(offset.size) % seq_len  # index in the row
    return float(np.minimum(offset + 1, index % self.window + 1 + self.window).mean())

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    """The q, k, v and output projections and the attention over the visible keys."""
    projections = 2 * self.dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    return projections + attention_flops(self.num_heads, self.head_dim, self.visible_keys(seq_len, doc_lengths))

  # -- the pieces ------------------------------------------------------------------------------

  def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, D] -> q [B, T, N, H], k, v [B, T, K, H]."""
    heads = (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_HEADS, None)
    kv_heads = (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_KV_HEADS, None)
    q, k, v = self.query(x), self.key(x), self.value(x)
    if self.position == 'rope':
      q, k = apply_rope(q, positions, base=self.rope_base), apply_rope(k, positions, base=self.rope_base)
    if self.qk_norm:
      q, k = l2_normalise(q), l2_normalise(k)
    return sharding.constrain(q, heads), sharding.constrain(k, kv_heads), sharding.constrain(v, kv_heads)

  def self_scale(self):
    return self.scale[...] if self.qk_norm else self.head_dim ** -0.5

  def bias(self, distance: jax.Array) -> jax.Array | None:
    """Query-key distances [..., T, S] -> [..., N, T, S] (T5 bias; times the learned scale under qk_norm)."""
    if self.relative_bias is None:
      return None
    table = self.relative_bias[...].astype(jnp.float32)
    if self.qk_norm:
      table = table * self.scale[...].astype(jnp.float32)
    bias = table[t5_bucket(distance, self.num_buckets, self.max_distance)]  # [..., T, S, N]
    return jnp.moveaxis(bias, -1, -3)

  def attend_tokens(self, q: jax.Array, k: jax.Array, v: jax.Array, segments: Segments,
                    cache: KVCache | None) -> tuple[jax.Array, Blocked | Keys]:
    """q [B, T, N, H], k/v [B, T, K, H] -> the self-attention o [B, T, N, H], and the keys attended
    (what the recurrent cell reads): flat for T < W new tokens after a cache (the cache's slots, then the
    new tokens), else blocked. Over its own tokens (no cache, or a prompt that continues no cached
    document: attention_ops.choose_path) a kernel serves where `kernel` names one."""
    token_index, documents = segments.index, segments.document
    if cache is not None and q.shape[1] < self.window:
      return self.flat(q, k, v, token_index, documents, cache)
    layout = Layout.build(token_index, self.window, cached=cache is not None)
    keys = layout_keys(layout, k, v, documents, cache)

    def blocked() -> jax.Array:
      return layout.take(self.blocked(layout, layout.place(q), keys))

    impl = self.kernel(q)
    if impl is None:
      o = blocked()
    else:
      own = OWN if cache is None else AFTER_CACHED
      o = attention_ops.choose_path(lambda: self.own_tokens(q, k, v, segments, impl), blocked, own,
                                    None if cache is None else cache.slot_document, documents)
    return o, Blocked(layout, keys)

  def kernel(self, q: jax.Array) -> str | None:
    """The shared kernel (cuDNN, splash) for self-attention over these queries' own tokens, or None:
    the blocked form."""
    if not kernel_mask(self.span, self.position):
      return None
    impl = attention_ops.resolve_impl(self.impl, q.dtype, self.head_dim, q.shape[1])
    return None if impl == 'xla' else impl

  def own_tokens(self, q: jax.Array, k: jax.Array, v: jax.Array, segments: Segments, impl: str) -> jax.Array:
    """Self-attention over the call's own tokens through the kernel `impl` -> [B, T, N, H]."""
    scale = self.self_scale()
    if self.qk_norm:  # the kernels take one scale: the learned per-head one goes into q
      q, scale = q * scale.astype(q.dtype)[:, None], 1.0
    return attention_ops.self_attention(q, k, v, segments.index, segments.document, self.window, scale, impl)

  def blocked(self, layout: Layout, q: jax.Array, keys: WindowKeys) -> jax.Array:
    """Padded queries [B, P, N, H] -> outputs [B, P, N, H]; window w attends to windows w - 1 and w."""
    w = self.window
    q_index, q_document = layout.windows(keys.index), layout.windows(keys.document)
    k_index = layout.with_previous(keys.index, layout.previous_index())
    k_document = layout.with_previous(keys.document, keys.prev_document)
    mask = visible(q_index, q_document, k_index, k_document, w, self.span)  # [B, nw, W, 2W]
    distance = (w + np.arange(w))[:, None] - np.arange(2 * w)[None]      # static in this layout
    out = attend(layout.windows(q), layout.with_previous(keys.k, keys.prev_k),
                 layout.with_previous(keys.v, keys.prev_v), mask, self.self_scale(), self.bias(distance))
    return out.reshape(q.shape)

  def flat(self, q: jax.Array, k: jax.Array, v: jax.Array, token_index: jax.Array, documents: jax.Array,
           cache: KVCache) -> tuple[jax.Array, Keys]:
    """New queries attend to the cache's slots and the new keys. Returns the outputs [B, T, N, H]
    and the keys attended (cache slots, then the new tokens)."""
    all_k = jnp.concatenate([cache.keys.astype(k.dtype), k], axis=1)
    all_v = jnp.concatenate([cache.values.astype(v.dtype), v], axis=1)
    k_index = jnp.concatenate([cache.slot_index, token_index], axis=1)
    k_document = jnp.concatenate([cache.slot_document, documents], axis=1)
    mask = visible(token_index, documents, k_index, k_document, self.window, self.span)
    bias = self.bias(token_index[:, :, None] - k_index[:, None, :])
    out = attend(q, all_k, all_v, mask, self.self_scale(), bias)
    return out, Keys(all_k, all_v, k_index, k_document)
