"""Scaled dot-product attention with causal, sliding-window and document masks.

softmax(q k^T * scale + mask) v (Vaswani et al. 2017, eq. 1) for MHA, GQA and
MQA (query heads grouped over `num_kv_heads`). Query i sees key j when both are
in the same document, j <= i and i - j < window (W keys including itself: the
Mistral / YOCO convention, flash-attn `window_size=(W-1, 0)`).

Two implementations behind `impl`: `xla` (the reference, runs everywhere,
materialises the [T, S] scores) and `cudnn` (cuDNN flash attention on GPU,
bf16/fp16 only; the window always goes with `is_causal=True`, since without it
some cuDNN versions attend to the future). `auto` picks cuDNN on a GPU when
the dtype and head size allow it.
"""
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('xla', 'cudnn', 'auto')
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


def resolve_impl(impl: str, dtype: jnp.dtype, head_dim: int) -> str:
  """Turns `auto` into `cudnn` or `xla` for this backend; checks an explicit choice."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'unknown attention impl {impl!r}; known: {IMPLEMENTATIONS}')
  if impl == 'auto':
    return 'cudnn' if jax.default_backend() == 'gpu' and cudnn_supported(dtype, head_dim) else 'xla'
  if impl == 'cudnn' and not cudnn_supported(dtype, head_dim):
    raise ValueError(f'cuDNN attention needs bf16/fp16 and head_dim % 8 == 0 (<= 256); got {jnp.dtype(dtype).name}, {head_dim}')
  return impl
