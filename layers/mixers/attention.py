"""Multi-head causal self-attention block mixer (MHA / GQA / MQA), optional window.

q = x W_q, k = x W_k, v = x W_v, rotated by RoPE at the token positions, then
attention_ops (causal, document and window masks), then y = o W_o. With a
cache the new keys are attended together with the cached ones and written
into the cache (full KV, or a ring buffer of W slots for a window;
KVCache.extend). attention_ops.attend picks the kernel path: a prompt that
continues no cached document (a prefill into an empty cache) attends over its
own tokens through the same kernels as training, so it never builds [T, T]
scores on a GPU or TPU.
"""
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from layers import sharding
from layers.blocks.kv_cache import KVCache
from layers.blocks.linear import Dense
from layers.blocks.rope import apply_rope
from layers.blocks.shared_keys import OWN, Keys
from layers.documents import Segments
from layers.flops import Lengths, attention_flops, document_lengths, mean_visible_keys
from layers.kernels import attention_ops


class Attention(nnx.Module):

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               window: int | None = None, rope_base: float = 10000.0, rope_style: str = 'standard',
               rope_fraction: float = 1.0, rope_frequencies: str = 'standard', impl: str = 'xla',
               out_init_scale: float = 1.0,
               out_bias: bool = False, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    if num_heads % num_kv_heads:
      raise ValueError(f'num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}')
    self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
    self.window = window
    self.rope = FrozenDict(base=rope_base, style=rope_style, fraction=rope_fraction,  # hashable: a static field
                           frequencies=rope_frequencies)
    self.impl = impl
    self.dtype = dtype
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query = Dense(dim, (num_heads, head_dim), names=(sharding.EMBED, sharding.HEADS, sharding.HEAD_DIM), **common)
    kv_names = (sharding.EMBED, sharding.KV_HEADS, sharding.HEAD_DIM)
    self.key = Dense(dim, (num_kv_heads, head_dim), names=kv_names, **common)
    self.value = Dense(dim, (num_kv_heads, head_dim), names=kv_names, **common)
    self.out = Dense((num_heads, head_dim), dim, names=(sharding.HEADS, sharding.HEAD_DIM, sharding.EMBED),
                     init_scale=out_init_scale, use_bias=out_bias, **common)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> KVCache:
    slots = max_len if self.window is None else min(self.window, max_len)
    keeps_all = self.window is None or self.window > max_len  # past max_len it would drop keys still in view
    return KVCache.create(batch, slots, self.num_kv_heads, self.head_dim, dtype, keeps_all=keeps_all)

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    """The q, k, v, out projections and attention over the keys each query sees."""
    projections = 2 * self.dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    keys = mean_visible_keys(document_lengths(seq_len, doc_lengths), self.window or 0)
    return projections + attention_flops(self.num_heads, self.head_dim, keys)

  def __call__(self, x: jax.Array, segments: Segments,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """x [B, T, D] -> y [B, T, D], updated cache."""
    positions = segments.positions
    heads = (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_HEADS, None)
    kv_heads = (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_KV_HEADS, None)
    q = sharding.constrain(apply_rope(self.query(x), positions, **self.rope), heads)  # [B, T, N, H]
    k = sharding.constrain(apply_rope(self.key(x), positions, **self.rope), kv_heads)  # [B, T, K, H]
    v = sharding.constrain(self.value(x), kv_heads)                                   # [B, T, K, H]
    if cache is None:
      keys = Keys(k, v, segments.index, segments.document, own=OWN)
    else:
      keys, cache = cache.extend(k, v, segments.index, segments.document)
    o = attention_ops.attend(q, segments, keys, self.window, self.head_dim ** -0.5, self.impl)
    return self.out(sharding.constrain(o, heads)), cache
