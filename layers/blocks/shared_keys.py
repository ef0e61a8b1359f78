"""The keys an attention reads, and the keys several layers share.

`Keys` are what one attention call attends to: keys and values [B, S, K, H]
with each key's token index and document. `SharedKeys` are what the decoder's
shared-keys stage (architectures/decoder.py) computes once per call for every
layer after it (YOCO's cross-decoder, GoldFinch's GOLD layers): a payload each
layer derives its keys and values from (YOCO: k and v; GOLD: its key and value
streams, layers/mixers/gold_attention.py) and where each key sits. It is the fourth
argument of those layers' mixers, `mixer(x, segments, cache, shared)`
(layers/blocks/residual.py).

Both say how the keys relate to the queries (`own`), from which
layers/kernels/attention_ops.choose_path picks the kernel path:

  OWN           the keys are exactly the queries' tokens (training): the training kernels (cuDNN, splash) serve
  AFTER_CACHED  cached keys, then the queries' tokens, the last T (a cached call over T > 1 tokens): when no
                cached key is of the document the queries continue, the queries' own tokens are all they see
  VISIBLE       any other set (a decode step's ring, or an early exit's last queries over every token)
"""
from typing import Any

import flax.struct
import jax

OWN, AFTER_CACHED, VISIBLE = 'own', 'after_cached', 'visible'


@flax.struct.dataclass
class Keys:
  """Keys and values a call's queries attend to, with each key's token index and document."""
  keys: jax.Array      # [B, S, K, H]
  values: jax.Array    # [B, S, K, H]
  index: jax.Array     # [B, S] int32
  document: jax.Array  # [B, S] int32, -1: visible to nobody
  own: str = flax.struct.field(pytree_node=False, default=VISIBLE)  # OWN, AFTER_CACHED or VISIBLE


@flax.struct.dataclass
class SharedKeys:
  """The keys several layers read: a payload each derives its keys and values from, and their places."""
  payload: Any                  # YOCO: (k, v) [B, S, K, H] each; GOLD: gold_attention.GoldStreams
  index: jax.Array              # [B, S] int32
  document: jax.Array           # [B, S] int32, -1: visible to nobody
  positions: jax.Array | None   # [B, S] int32 (RoPE); None where the payload is rotated already (YOCO)
  own: str = flax.struct.field(pytree_node=False, default=VISIBLE)  # OWN, AFTER_CACHED or VISIBLE

  def attended(self, keys: jax.Array, values: jax.Array) -> Keys:
    """A layer's keys and values [B, S, K, H], derived from the payload, at these places."""
    return Keys(keys, values, self.index, self.document, self.own)

  def seen_by_last_queries(self) -> 'SharedKeys':
    """The same keys for queries that are only the last of the call's tokens (an early exit): VISIBLE."""
    return self.replace(own=VISIBLE)
