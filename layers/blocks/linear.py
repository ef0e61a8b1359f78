"""Dense projection over one or more trailing axes, with logical axis names.

y[..., o1, o2] = sum_{i1, i2} x[..., i1, i2] W[i1, i2, o1, o2] (+ b[o1, o2]),
computed in `dtype` (bf16 by default in the models) from float32 parameters;
the kernel is initialised fan-in truncated normal with variance `init_scale / fan_in`.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.param_roles import BIAS, PROJECTION, param


def _as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
  return (x,) if isinstance(x, int) else tuple(x)


class Dense(nnx.Module):

  def __init__(self, in_features: int | Sequence[int], out_features: int | Sequence[int], *,
               names: Sequence[str | None], use_bias: bool = False, init_scale: float = 1.0,
               dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    in_shape, out_shape = _as_tuple(in_features), _as_tuple(out_features)
    if len(names) != len(in_shape) + len(out_shape):
      raise ValueError(f'names {names} must name every kernel axis of {in_shape + out_shape}')
    self.num_in = len(in_shape)
    self.dtype = dtype
    n_in = len(in_shape)
    init = nnx.initializers.variance_scaling(
        init_scale, 'fan_in', 'truncated_normal',
        in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + len(out_shape))))
    self.kernel = param(sharding.partitioned(init, names)(rngs.params(), in_shape + out_shape, param_dtype),
                        PROJECTION)
    bias_init = sharding.partitioned(nnx.initializers.zeros, names[n_in:])
    self.bias = param(bias_init(None, out_shape, param_dtype), BIAS) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., *in] -> [..., *out]
    n = self.num_in
    contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
    y = jax.lax.dot_general(x.astype(self.dtype), self.kernel[...].astype(self.dtype), (contract, ((), ())))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y
