"""Gated retention: YOCO's self-decoder mixer (Sun et al. 2024; docs/architectures.md, YOCO).

    q, k = RoPE(x W_q), RoPE(x W_k) * d_k^-0.5,   v = x W_v,   g = x W_g
    log gamma = logsigmoid(x W_gamma) / 16           (one scalar per head and token)
    o = retention(q, k, v, log gamma)                (gated_retention_ops.py)
    y = (silu(g) * RMSNorm_head(o)) W_o              (per-head RMSNorm without weight)

Training and prefill use the chunked form (`chunk_size` tokens per chunk; a
chunk of at least T tokens is the parallel form); a single decode step uses
the recurrence on a float32 state [B, N, d_k, d_v], which is the whole decode
cache of the layer: its size does not grow with the context. Position 0 (a
document start) empties the state; padding (position -1) is an identity step
(no input, no decay) with a zero output, so it disturbs no real token. It
follows the mixer protocol (layers/blocks/residual.py).
"""
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from layers import sharding
from layers.blocks.linear import Dense
from layers.blocks.rope import apply_rope
from layers.documents import Segments
from layers.flops import Lengths, attention_flops, mean_visible_keys
from layers.mixers import gated_retention_ops


@flax.struct.dataclass
class RetentionCache:
  state: jax.Array  # [B, N, d_k, d_v] float32

  @classmethod
  def create(cls, batch: int, num_heads: int, head_dim: int) -> 'RetentionCache':
    return cls(state=jnp.zeros((batch, num_heads, head_dim, head_dim), jnp.float32))


class GatedRetention(nnx.Module):
  """x [B, T, D] -> (silu(x W_g) * RMSNorm_head(retention(q, k, v, gamma))) W_o, as the module docstring writes."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, chunk_size: int = 256,
               gate_logit_normalizer: float = 16.0, norm_eps: float = 1e-5, rope_base: float = 10000.0,
               rope_style: str = 'interleaved', rope_frequencies: str = 'linspace', out_init_scale: float = 1.0,
               dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if chunk_size <= 0:
      raise ValueError(f'retention chunk_size must be positive, got {chunk_size}')
    self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
    self.chunk_size = chunk_size
    self.gate_logit_normalizer = gate_logit_normalizer
    self.norm_eps = norm_eps
    self.rope = FrozenDict(base=rope_base, style=rope_style, frequencies=rope_frequencies)  # hashable: static
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    names = (sharding.EMBED, sharding.HEADS, sharding.HEAD_DIM)
    self.query = Dense(dim, (num_heads, head_dim), names=names, **common)
    self.key = Dense(dim, (num_heads, head_dim), names=names, **common)
    self.value = Dense(dim, (num_heads, head_dim), names=names, **common)
    self.gate = Dense(dim, (num_heads, head_dim), names=names, **common)
    self.decay = Dense(dim, num_heads, names=(sharding.EMBED, sharding.HEADS), **common)
    self.out = Dense((num_heads, head_dim), dim, names=(sharding.HEADS, sharding.HEAD_DIM, sharding.EMBED),
                     init_scale=out_init_scale, **common)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> RetentionCache:
    """The float32 state, whatever `dtype`; its size does not depend on `max_len`."""
    del max_len, dtype
    return RetentionCache.create(batch, self.num_heads, self.head_dim)

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    """q, k, v, g, out projections and the decay gate; q k^T and A v inside a chunk; q S and k^T v on the state."""
    del doc_lengths  # the chunks are computed whole, whatever the documents
    width = self.num_heads * self.head_dim
    projections = 2 * self.dim * 5 * width + 2 * self.dim * self.num_heads
    within_chunk = attention_flops(self.num_heads, self.head_dim, mean_visible_keys(min(self.chunk_size, seq_len)))
    return projections + within_chunk + 2 * 2 * width * self.head_dim

  def __call__(self, x: jax.Array, segments: Segments,
               cache: RetentionCache | None = None) -> tuple[jax.Array, RetentionCache | None]:
    """x [B, T, D] -> y [B, T, D], updated cache (the mixer protocol, layers/blocks/residual.py)."""
    positions = segments.positions                                                   # [B, T]
    heads = (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_HEADS, None)
    padding = positions < 0                                                          # [B, T]
    q = sharding.constrain(apply_rope(self.query(x), positions, **self.rope), heads)  # [B, T, N, H]
    k = apply_rope(self.key(x), positions, **self.rope)
    k = k * jnp.asarray(self.head_dim ** -0.5, k.dtype)
    k = sharding.constrain(jnp.where(padding[..., None, None], 0, k), heads)
    v = sharding.constrain(self.value(x), heads)
    log_decay = jax.nn.log_sigmoid(self.decay(x).astype(jnp.float32)) / self.gate_logit_normalizer  # [B, T, N]
    log_decay = sharding.constrain(jnp.where(padding[..., None], 0.0, log_decay),
                                   (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_HEADS))
    reset = positions == 0
    state = None if cache is None else cache.state
    if cache is not None and x.shape[1] == 1:  # decode: one recurrent step
      o, state = gated_retention_ops.retention_step(state, q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], reset[:, 0])
      o = o[:, None]
    else:  # training and prefill (chunk_size >= T is the parallel form)
      o, state = gated_retention_ops.chunked_retention(q, k, v, log_decay, reset, state, chunk_size=self.chunk_size)
    o = jnp.where(padding[..., None, None], 0.0, o)  # [B, T, N, H] float32
    o = o * jax.lax.rsqrt(jnp.mean(jnp.square(o), axis=-1, keepdims=True) + self.norm_eps)
    gate = self.gate(x)
    o = jax.nn.silu(gate) * o.astype(gate.dtype)
    y = self.out(sharding.constrain(o, heads))
    return y, (None if cache is None else RetentionCache(state=state))
