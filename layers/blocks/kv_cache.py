"""Decode cache of one attention layer: keys and values in S slots, and the keys a cached call sees.

Global attention keeps every token (S = max_len); a sliding window of W keeps
a ring buffer of W slots, token i in slot i mod W. Each slot also records the
index and document of the token it holds (-1 when empty), so the attention
mask for cached keys is computed exactly as for fresh ones. A cache that keeps
every token (`keeps_all`) written past its S slots would reuse them the same
way and silently turn global attention into a sliding window: the model's
cache reports it (architectures.base.ModelCache.overflowed) for callers to refuse.
"""
import flax.struct
import jax
import jax.numpy as jnp

from layers.blocks.shared_keys import AFTER_CACHED, VISIBLE, Keys
from layers.documents import PAD_DOCUMENT


@flax.struct.dataclass
class KVCache:
  keys: jax.Array          # [B, S, K, H]
  values: jax.Array        # [B, S, K, H]
  slot_index: jax.Array    # [B, S] int32, -1 when empty
  slot_document: jax.Array  # [B, S] int32, -1 when empty
  keeps_all: bool = flax.struct.field(pytree_node=False, default=False)  # S = max_len: no token may be overwritten

  @classmethod
  def create(cls, batch: int, slots: int, num_kv_heads: int, head_dim: int,
             dtype: jnp.dtype, *, keeps_all: bool = False) -> 'KVCache':
    kv = jnp.zeros((batch, slots, num_kv_heads, head_dim), dtype)
    empty = jnp.full((batch, slots), PAD_DOCUMENT, jnp.int32)
    return cls(keys=kv, values=kv, slot_index=empty, slot_document=empty, keeps_all=keeps_all)

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
    return self.replace(
        keys=self.keys.at[rows, slots].set(keys[:, -n:].astype(self.keys.dtype)),
        values=self.values.at[rows, slots].set(values[:, -n:].astype(self.values.dtype)),
        slot_index=self.slot_index.at[rows, slots].set(index),
        slot_document=self.slot_document.at[rows, slots].set(documents[:, -n:]))

  def extend(self, keys: jax.Array, values: jax.Array, token_index: jax.Array,
             documents: jax.Array) -> tuple[Keys, 'KVCache']:
    """The keys a cached call attends to, and the cache with this call's tokens written.

    One new token (decoding): written first and read back from the S slots, so the cache is
    not copied; exact while the cache holds every key the token may see (always for a window
    ring, whose overwritten slot is the one that just left the window; for a global cache while
    the context fits it, which the sampler ensures). More tokens: the slots as they were and the
    new keys side by side, [S + T] (a ring may overwrite keys that earlier new tokens still see):
    the new tokens are the last T keys (AFTER_CACHED, layers/blocks/shared_keys.py).
    """
    written = self.write(keys, values, token_index, documents)
    if keys.shape[1] == 1:
      return Keys(written.keys.astype(keys.dtype), written.values.astype(values.dtype), written.slot_index,
                  written.slot_document, own=VISIBLE), written
    side_by_side = Keys(jnp.concatenate([self.keys.astype(keys.dtype), keys], axis=1),      # [B, S + T, K, H]
                        jnp.concatenate([self.values.astype(values.dtype), values], axis=1),
                        jnp.concatenate([self.slot_index, token_index], axis=1),          # [B, S + T]
                        jnp.concatenate([self.slot_document, documents], axis=1), own=AFTER_CACHED)
    return side_by_side, written
