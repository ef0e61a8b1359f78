"""Gated MLP: down(act(x W_gate) * (x W_up)) (Shazeer 2020, "GLU Variants").

`activation='silu'` is SwiGLU (Llama), `'gelu'` is GeGLU with the tanh GELU
(Gemma / RecurrentGemma).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.blocks.linear import Dense

ACTIVATIONS = {
    'silu': jax.nn.silu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=True),
}


class GatedMLP(nnx.Module):

  def __init__(self, dim: int, hidden_dim: int, *, activation: str = 'silu', use_bias: bool = False,
               out_init_scale: float = 1.0, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f'unknown MLP activation {activation!r}; known: {sorted(ACTIVATIONS)}')
    self.activation = activation
    self.dim, self.hidden_dim = dim, hidden_dim
    common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = Dense(dim, hidden_dim, names=(sharding.EMBED, sharding.MLP), **common)
    self.up = Dense(dim, hidden_dim, names=(sharding.EMBED, sharding.MLP), **common)
    self.down = Dense(hidden_dim, dim, names=(sharding.MLP, sharding.EMBED), init_scale=out_init_scale, **common)

  def flops_per_token(self) -> float:
    return 2 * 3 * self.dim * self.hidden_dim

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
    hidden = ACTIVATIONS[self.activation](self.gate(x)) * self.up(x)  # [B, T, M]
    hidden = sharding.constrain(hidden, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_MLP))
    return self.down(hidden)
