"""Causal self-attention over packed rows with the TPU splash-attention kernel.

The same function as attention_ops.xla_attention with visibility_mask: query i
sees key j when both lie in one document (splash segment ids), j <= i, and,
with a window W, i - j < W (splash LocalMask window_size=(W - 1, 0): W keys
including itself). The kernel skips the blocks the mask empties, so a window
costs W keys per query, not T. Rows are sharded over the batch mesh axes and
query heads over the heads axes (one kernel per device, inside shard_map); the
K/V heads, replicated over the heads axes, are sliced to those the local query
heads read. Off TPU the kernel runs in Pallas interpret mode (for tests).
"""
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from layers import sharding
from layers.kernels import kernel_sharding

BLOCK_SIZES = (512, 256, 128)  # tried in order: the largest dividing T (lanes: a multiple of 128)


def unsupported(length: int | None) -> str | None:
  """Why splash cannot serve self-attention over rows of `length` (None: keys are not the row), or None.

  Any head_dim compiles for TPU (checked from 4 to 1024: Mosaic pads it to the 128 lanes)."""
  if length is None:
    return 'the keys are not the queries\' own row (a KV cache or cross-attention)'
  if length % BLOCK_SIZES[-1]:
    return f'sequence length {length} is not a multiple of {BLOCK_SIZES[-1]} (the smallest splash block)'
  return None


def _kernel(num_heads: int, length: int, window: int | None, interpret: bool):
  """The splash kernel for `num_heads` heads of one row (q [N, T, H], k/v [K, T, H])."""
  if window is None or window >= length:
    mask = splash.CausalMask((length, length))
  else:
    mask = splash.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
  block = next(b for b in BLOCK_SIZES if length % b == 0)
  blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                             block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(splash.MultiHeadMask([mask] * num_heads), block_sizes=blocks, head_shards=1,
                                q_seq_shards=1, interpret=interpret)


def _local_kv(kv: jax.Array, num_heads: int, heads: tuple[str, ...]) -> jax.Array:
  """kv [B, K, T, H] (all K/V heads) -> the K/V heads that this device's query heads read."""
  num_kv = kv.shape[1]
  group = num_heads // num_kv
  shard, count = kernel_sharding.shards(heads)
  local = num_heads // count
  first = shard * local // group  # K/V head of the first local query head
  if local % group == 0 or group % local == 0:  # whole groups, or heads within one group
    return jax.lax.dynamic_slice_in_dim(kv, first, max(local // group, 1), axis=1)
  return jnp.take(kv, (shard * local + jnp.arange(local)) // group, axis=1)  # one K/V head per query head


def splash_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, documents: jax.Array,
                          window: int | None, scale: float) -> jax.Array:
  """q [B, T, N, H], k/v [B, T, K, H], documents [B, T] -> [B, T, N, H]."""
  batch, length, num_heads, _ = q.shape
  problem = unsupported(length)
  if problem:
    raise ValueError(f'splash attention: {problem}')
  interpret = kernel_sharding.compile_platform() != 'tpu'
  rows = kernel_sharding.mesh_axes(sharding.ACT_BATCH, batch)
  heads = kernel_sharding.mesh_axes(sharding.ACT_HEADS, num_heads)

  def attend(q, k, v, documents):  # one device's rows and query heads
    local_heads = q.shape[2]
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q * jnp.asarray(scale, q.dtype), k, v))  # [b, heads, T, H]
    k, v = _local_kv(k, num_heads, heads), _local_kv(v, num_heads, heads)
    kernel = _kernel(local_heads, length, window, interpret)
    o = jax.vmap(lambda q, k, v, d: kernel(q, k, v, segment_ids=splash.SegmentIds(d, d)))(q, k, v, documents)
    return jnp.swapaxes(o, 1, 2)  # [b, T, n, H]

  q_spec = kernel_sharding.spec((rows, (), heads, ()))
  kv_spec = kernel_sharding.spec((rows, (), (), ()))
  return kernel_sharding.run_sharded(attend, (q, k, v, documents),
                                     (q_spec, kv_spec, kv_spec, kernel_sharding.spec((rows, ()))), q_spec)
