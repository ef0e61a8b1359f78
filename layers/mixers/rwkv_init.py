"""What RWKV-6 (Finch) and GOLD layers share: their layer-dependent initial values and LoRAs.

The reference's ratio_0_to_1 / ratio_1_to_almost0 and time_maa profiles, the
lookup of a traced layer's row (layers built by nnx.vmap to be scanned), the
recurrence parameters that start at those values, and the LoRA
tanh(x A) B with A = 0 and B ~ U(+-0.01) at start (docs/architectures.md, GoldFinch).
"""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import sharding
from layers.param_roles import LORA, RECURRENCE, param


def layer_ratios(layer: int, num_layers: int) -> tuple[float, float]:
  """(layer / (L - 1), 1 - layer / L): the reference's ratio_0_to_1 and ratio_1_to_almost0."""
  return layer / max(num_layers - 1, 1), 1.0 - layer / num_layers


def mix_profile(dim: int, power: float, offset: float = 0.0) -> np.ndarray:
  """1 - ((i / D)^power + offset) for channel i: the reference's time_maa_* initial values."""
  ddd = np.arange(dim, dtype=np.float64) / dim
  return (1.0 - (ddd ** power + offset)).astype(np.float32)


def per_layer(values: Callable[[int], Any], layer: int | jax.Array, num_layers: int) -> Any:
  """`values(layer)` (numpy arrays) for a Python int layer; for a traced index (layers built by nnx.vmap),
  row `layer` of every layer's values stacked: the same numbers, looked up."""
  if isinstance(layer, (int, np.integer)):
    return values(int(layer))
  return jax.tree.map(lambda *rows: jnp.asarray(np.stack(rows))[layer], *[values(i) for i in range(num_layers)])


def constant(value: np.ndarray | jax.Array, names, dtype: jnp.dtype) -> nnx.Param:
  """A recurrence parameter (token-shift mix, decay, bonus) starting at `value` (a numpy array, or a
  looked-up row of one), with logical axis names."""
  init = lambda key, shape, dtype: jnp.asarray(value, dtype).reshape(shape)
  return param(sharding.partitioned(init, names)(None, value.shape, dtype), RECURRENCE)


def lora_uniform(rngs: nnx.Rngs, shape, names, dtype: jnp.dtype, scale: float = 0.01) -> nnx.Param:
  """A LoRA matrix drawn from U(-scale, scale) (the reference's w2)."""
  init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -scale, scale)
  return param(sharding.partitioned(init, names)(rngs.params(), shape, dtype), LORA)


def lora_zeros(shape, names, dtype: jnp.dtype) -> nnx.Param:
  """A LoRA matrix starting at zero (the reference's w1)."""
  return param(sharding.partitioned(nnx.initializers.zeros, names)(None, shape, dtype), LORA)


def lora(x: jax.Array, a: jax.Array, b: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """tanh(x A) B over the last axis of x; A [D, R], B [R, ...out]."""
  h = jnp.tanh(jnp.einsum('...d,dr->...r', x.astype(dtype), a.astype(dtype)))
  return jnp.tensordot(h, b.astype(dtype), axes=1)
