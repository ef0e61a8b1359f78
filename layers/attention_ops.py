"""Scaled dot-product attention with causal, sliding-window and document masks.

softmax(q k^T * scale + mask) v (Vaswani et al. 2017, eq. 1) for MHA, GQA and
MQA (query heads grouped over `num_kv_heads`). Query i sees key j when both are
in the same document, j <= i and i - j < window (W keys including itself: the
Mistral / YOCO convention, flash-attn `window_size=(W-1, 0)`).

Three implementations behind `impl`: `xla` (the reference, runs everywhere,
materialises the [T, S] scores), `cudnn` (cuDNN flash attention on GPU,
bf16/fp16 only; the window always goes with `is_causal=True`, since without it
some cuDNN versions attend to the future) and `splash` (the TPU splash kernel,
layers/splash_attention.py; Pallas interpret mode elsewhere). The kernels serve
self-attention over the queries' own row (`self_attention`); with a KV cache
or other keys the XLA form runs. `auto` picks cuDNN when compiling for a GPU
and splash when compiling for a TPU (kernel_sharding.compile_platform: the
active mesh's devices), where they apply, and XLA otherwise.
"""
import jax
import jax.numpy as jnp

from layers import kernel_sharding, splash_attention

IMPLEMENTATIONS = ('xla', 'cudnn', 'splash', 'auto')
_MASKED = -1e30  # finite, so a fully masked (padding) query gives a finite output


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


def cudnn_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, documents: jax.Array,
                         window: int | None, scale: float) -> jax.Array:
  """Causal self-attention over one packed row with cuDNN (GPU, bf16/fp16)."""
  length = q.shape[1]
  same_document = (documents[:, :, None] == documents[:, None, :]) & (documents[:, None, :] >= 0)
  local = (window - 1, 0) if window is not None and window < length else None
  return jax.nn.dot_product_attention(
      q, k, v, mask=same_document[:, None], scale=scale, is_causal=True,
      local_window_size=local, implementation='cudnn')


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
    raise ValueError(f'cuDNN attention needs bf16/fp16 and head_dim % 8 == 0 (<= 256); got {jnp.dtype(dtype).name}, {head_dim}')
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
  mask = visibility_mask(token_index, documents, token_index, documents, window)
  return xla_attention(q, k, v, mask, scale)
