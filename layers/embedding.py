"""Token embedding table, also usable as the tied output projection (logits = h E^T)."""
import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding


class Embed(nnx.Module):

  def __init__(self, vocab_size: int, dim: int, *, init_std: float = 1.0,
               dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.dtype = dtype
    init = sharding.partitioned(nnx.initializers.normal(init_std), (sharding.VOCAB, sharding.EMBED))
    self.table = nnx.Param(init(rngs.params(), (vocab_size, dim), param_dtype))

  def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] int32 -> [B, T, D]
    return jnp.take(self.table[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V] float32
    return jnp.einsum('btd,vd->btv', x.astype(self.dtype), self.table[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)
