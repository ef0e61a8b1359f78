"""Token shift: each token's input paired with the previous token's, within its document.

    x_prev_t = x_{t-1}   if token t-1 is in the same document as token t
             = 0         at a document start, at the first token of a row, after padding

(RWKV's time shift, `nn.ZeroPad2d((0, 0, 1, -1))`, made document-aware). The
predecessor is the token at index t - 1 of the row: padding (document -1) is a
hole that occupies its index, as for the causal convolution (layers/blocks/conv1d.py),
whose `ConvState` (width 2: the last input and its document) is the decode
state here, so a cached call sees exactly the predecessor a full pass would.
`lerp(x, x_prev, mu) = x + (x_prev - x) * mu` is the mix every RWKV block uses.
"""
import jax
import jax.numpy as jnp

from layers.blocks.conv1d import ConvState
from layers.documents import PAD_DOCUMENT


def init_state(batch: int, dim: int, dtype: jnp.dtype) -> ConvState:
  return ConvState.create(batch, 2, dim, dtype)


def token_shift(x: jax.Array, documents: jax.Array,
                state: ConvState | None = None) -> tuple[jax.Array, ConvState | None]:
  """x [B, T, D], documents [B, T] -> x_prev [B, T, D], the state after the last token (None without one)."""
  batch, _, dim = x.shape
  if state is None:
    before, before_document = jnp.zeros((batch, 1, dim), x.dtype), jnp.full((batch, 1), PAD_DOCUMENT, jnp.int32)
  else:
    before, before_document = state.inputs.astype(x.dtype), state.documents
  previous = jnp.concatenate([before, x[:, :-1]], axis=1)
  previous_document = jnp.concatenate([before_document, documents[:, :-1]], axis=1)
  visible = (previous_document == documents) & (previous_document != PAD_DOCUMENT)
  x_prev = jnp.where(visible[..., None], previous, 0)
  if state is None:
    return x_prev, None
  return x_prev, ConvState(inputs=x[:, -1:].astype(state.inputs.dtype), documents=documents[:, -1:])


def lerp(x: jax.Array, x_prev: jax.Array, mu: jax.Array) -> jax.Array:
  return x + (x_prev - x) * mu
