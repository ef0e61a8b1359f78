"""Continuous inputs in, predictions out: the two ends of a forecasting model.

in:  x_t = v_t W_in + b (v_t: F features at step t)
out: prediction of v_{t+1} = h_t W_out + b, float32.
Same methods as token_io.TokenIO (`embed_tokens`, `logits`), so any family
built on them forecasts a time series when config.model.input_features > 0.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.blocks.linear import Dense


class SeriesIO(nnx.Module):
  logits_soft_cap = 0.0  # predictions are never capped

  def __init__(self, features: int, dim: int, *, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.dim, self.features = dim, features
    common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.project_in = Dense(features, dim, names=(None, sharding.EMBED), **common)
    self.project_out = Dense(dim, features, names=(sharding.EMBED, None), **common)

  def flops_per_token(self) -> float:
    """Both projections, in and out."""
    return 2 * 2 * self.features * self.dim

  def embed_tokens(self, values: jax.Array) -> jax.Array:  # [B, T, F] float -> [B, T, D]
    x = self.project_in(values)
    return sharding.constrain(x, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED))

  def logits(self, h: jax.Array, capped: bool = True) -> jax.Array:  # [B, T, D] -> [B, T, F] float32 predictions
    del capped  # no cap
    return self.project_out(h).astype(jnp.float32)
