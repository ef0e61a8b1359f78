"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * scale (Zhang & Sennrich 2019).

With `zero_centered=True` the learned scale is stored as `scale - 1` and
initialised to 0 (Gemma / RecurrentGemma: `x * rsqrt(...) * (1 + scale)`).
The normalisation runs in float32 whatever the input dtype.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.param_roles import NORM, param


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float = 1e-6, zero_centered: bool = False,
               param_dtype: jnp.dtype = jnp.float32):
    self.eps = eps
    self.zero_centered = zero_centered
    init = nnx.initializers.zeros if zero_centered else nnx.initializers.ones
    self.scale = param(sharding.partitioned(init, (sharding.NORM,))(None, (dim,), param_dtype), NORM)

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    if self.zero_centered:
      scale = 1.0 + scale
    return (y * scale).astype(x.dtype)
