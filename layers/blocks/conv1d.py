"""Causal depthwise temporal convolution (Griffin's Conv1D), document-aware.

    y_t = b + sum_{k=0}^{W-1} w[W-1-k] * x_{t-k} * [x_{t-k} is in the document of x_t]

per channel, width W = 4 in Griffin (De et al. 2024, sec. 2.4). `w[W-1]`
multiplies the current token (the layout of recurrentgemma's Conv1D weight).
A tap is dropped when a document starts between it and the current token, or
when it is padding (document id -1); the bias always stays. Documents come
from `layers.documents.locate`, so this mask is the same one the attention
uses: padding is a hole that occupies its index, as it does for a window.

Decode state (`ConvState`): the last W-1 inputs and their document ids, so a
cached call (one token or a chunk) sees exactly the taps a full forward pass
would. Training calls pass no state (an empty one: no taps before the row).
"""
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.documents import PAD_DOCUMENT
from layers.param_roles import BIAS, PROJECTION, param


@flax.struct.dataclass
class ConvState:
  inputs: jax.Array     # [B, W-1, D]: the last W-1 inputs, oldest first
  documents: jax.Array  # [B, W-1] int32: their document ids (-1: empty or padding)

  @classmethod
  def create(cls, batch: int, width: int, dim: int, dtype: jnp.dtype) -> 'ConvState':
    return cls(inputs=jnp.zeros((batch, width - 1, dim), dtype),
               documents=jnp.full((batch, width - 1), PAD_DOCUMENT, jnp.int32))


class CausalConv1D(nnx.Module):

  def __init__(self, dim: int, width: int = 4, *, init_scale: float = 0.01, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    """Kernel [W, D] fan-in (= W) normal with variance init_scale / W (recurrentgemma: 0.01); bias 0."""
    if width < 1:
      raise ValueError(f'conv width must be >= 1, got {width}')
    self.dim, self.width = dim, width
    self.dtype = dtype
    init = nnx.initializers.variance_scaling(init_scale, 'fan_in', 'truncated_normal', in_axis=0, out_axis=1)
    self.kernel = param(sharding.partitioned(init, (sharding.CONV, sharding.LRU))(
        rngs.params(), (width, dim), param_dtype), PROJECTION)
    self.bias = param(sharding.partitioned(nnx.initializers.zeros, (sharding.LRU,))(None, (dim,), param_dtype), BIAS)

  def init_state(self, batch: int, dtype: jnp.dtype) -> ConvState:
    return ConvState.create(batch, self.width, self.dim, dtype)

  def __call__(self, x: jax.Array, documents: jax.Array,
               state: ConvState | None = None) -> tuple[jax.Array, ConvState | None]:
    """x [B, T, D], documents [B, T] -> y [B, T, D], new state (None when called without one)."""
    previous = ConvState.create(x.shape[0], self.width, x.shape[2], x.dtype) if state is None else state
    y, new_state = causal_conv1d(x.astype(self.dtype), documents, self.kernel[...].astype(self.dtype),
                                 self.bias[...].astype(self.dtype), previous)
    if state is None:
      return y, None
    return y, ConvState(inputs=new_state.inputs.astype(state.inputs.dtype), documents=new_state.documents)


@jax.jit
def causal_conv1d(x: jax.Array, documents: jax.Array, kernel: jax.Array, bias: jax.Array,
                  state: ConvState) -> tuple[jax.Array, ConvState]:
  """The convolution as a pure function (jitted, so an un-jitted call compiles once, not op by op).

  x [B, T, D] after state.inputs [B, W-1, D]; kernel [W, D], bias [D] -> y [B, T, D] and the new state.
  """
  width, length = kernel.shape[0], x.shape[1]
  history = width - 1
  inputs = jnp.concatenate([state.inputs.astype(x.dtype), x], axis=1)  # [B, W-1+T, D]
  docs = jnp.concatenate([state.documents, documents], axis=1)          # [B, W-1+T]
  y = jnp.zeros_like(x)
  for back in range(width):  # tap x_{t-back}
    tap = inputs[:, history - back:history - back + length]
    tap_document = docs[:, history - back:history - back + length]
    visible = (tap_document == documents) & (tap_document != PAD_DOCUMENT)
    y = y + jnp.where(visible[..., None], tap, 0) * kernel[width - 1 - back]
  y = y + bias
  return y, ConvState(inputs=inputs[:, inputs.shape[1] - history:], documents=docs[:, docs.shape[1] - history:])
