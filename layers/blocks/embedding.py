"""Token embedding table, also usable as the tied output projection (logits = h E^T).

The tied logits are float32 (accumulated in float32 from compute-dtype inputs). Left
to autodiff, their float32 cotangent would turn both backward matmuls into float32
GEMMs: on an H200 these were the two slowest kernels of a Griffin step at vocabulary
32768 (docs/performance.md, the 1B Griffin's profile). `logits_matmul` rounds the
cotangent to the compute dtype first, so the backward matmuls run like the forward one
(compute dtype in, float32 accumulation), as MaxText's bf16 logits do; in float32 it
is plain autodiff.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.param_roles import EMBEDDING, param


@jax.custom_vjp
def logits_matmul(x: jax.Array, table: jax.Array) -> jax.Array:  # [B, T, D], [V, D] -> [B, T, V] float32
  return jnp.einsum('btd,vd->btv', x, table, preferred_element_type=jnp.float32)


def _logits_matmul_forward(x, table):
  return logits_matmul(x, table), (x, table)


def _logits_matmul_backward(residuals, cotangent):  # cotangent [B, T, V] float32
  x, table = residuals
  cotangent = cotangent.astype(x.dtype)
  dx = jnp.einsum('btv,vd->btd', cotangent, table, preferred_element_type=jnp.float32)
  dtable = jnp.einsum('btv,btd->vd', cotangent, x, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dtable.astype(table.dtype)


logits_matmul.defvjp(_logits_matmul_forward, _logits_matmul_backward)


class Embed(nnx.Module):

  def __init__(self, vocab_size: int, dim: int, *, init_std: float = 1.0,
               dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.dtype = dtype
    init = sharding.partitioned(nnx.initializers.normal(init_std), (sharding.VOCAB, sharding.EMBED))
    self.table = param(init(rngs.params(), (vocab_size, dim), param_dtype), EMBEDDING)

  def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] int32 -> [B, T, D]
    return jnp.take(self.table[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V] float32
    return logits_matmul(x.astype(self.dtype), self.table[...].astype(self.dtype))
