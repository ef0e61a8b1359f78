"""Decode cache of one attention layer: keys and values in S slots.

Global attention keeps every token (S = max_len); a sliding window of W keeps
a ring buffer of W slots, token i in slot i mod W. Each slot also records the
index and document of the token it holds (-1 when empty), so the attention
mask for cached keys is computed exactly as for fresh ones.
"""
import flax.struct
import jax
import jax.numpy as jnp

from layers.documents import PAD_DOCUMENT


@flax.struct.dataclass
class KVCache:
  keys: jax.Array          # [B, S, K, H]
  values: jax.Array        # [B, S, K, H]
  slot_index: jax.Array    # [B, S] int32, -1 when empty
  slot_document: jax.Array  # [B, S] int32, -1 when empty

  @classmethod
  def create(cls, batch: int, slots: int, num_kv_heads: int, head_dim: int,
             dtype: jnp.dtype) -> 'KVCache':
    kv = jnp.zeros((batch, slots, num_kv_heads, head_dim), dtype)
    empty = jnp.full((batch, slots), PAD_DOCUMENT, jnp.int32)
    return cls(keys=kv, values=kv, slot_index=empty, slot_document=empty)

  @property
  def num_slots(self) -> int:
    return self.keys.shape[1]

  def write(self, keys: jax.Array, values: jax.Array, token_index: jax.Array,
            documents: jax.Array) -> 'KVCache':
    """Stores new tokens (k/v [B, T, K, H], index/document [B, T]) at slot = index mod S.

    Only the last min(T, S) tokens are written: in a ring they are the ones
    that survive, and their slots are distinct, so the scatter is well defined.
    """
    n = min(keys.shape[1], self.num_slots)
    index = token_index[:, -n:]  # [B, n]
    slots = index % self.num_slots
    rows = jnp.arange(index.shape[0])[:, None]
    return KVCache(
        keys=self.keys.at[rows, slots].set(keys[:, -n:].astype(self.keys.dtype)),
        values=self.values.at[rows, slots].set(values[:, -n:].astype(self.values.dtype)),
        slot_index=self.slot_index.at[rows, slots].set(index),
        slot_document=self.slot_document.at[rows, slots].set(documents[:, -n:]))
