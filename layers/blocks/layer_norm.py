"""LayerNorm with a learned scale and bias (Ba et al. 2016), also per group (GroupNorm).

    y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias

over the trailing `len(shape)` axes of x (`shape` is the parameters' shape), or,
with `group_axes=1` on a [..., N, H] input, over each group's H channels only
(GroupNorm with N groups, one scale and bias per channel: RWKV-6's `ln_x`).
Normalisation in float32; the output has the input's dtype.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.param_roles import NORM, param


class LayerNorm(nnx.Module):

  def __init__(self, shape: int | Sequence[int], *, eps: float = 1e-5, group_axes: int | None = None,
               scale_init: float = 1.0, param_dtype: jnp.dtype = jnp.float32):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    self.eps = eps
    self.axes = tuple(range(-(group_axes or len(shape)), 0))
    names = (sharding.NORM,) * len(shape)
    self.scale = param(sharding.partitioned(nnx.initializers.constant(scale_init), names)(None, shape, param_dtype),
                       NORM)
    self.bias = param(sharding.partitioned(nnx.initializers.zeros, names)(None, shape, param_dtype), NORM)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=self.axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=self.axes, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)
