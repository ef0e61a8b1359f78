"""Where each token sits: its index in the row and the document it belongs to.

Packed rows hold several documents; `positions` restart at 0 at every document
start and are -1 on padding. Every mixer derives its resets from here: a token
may only see tokens of its own document (same id), and padding (id -1) is seen
by nobody. `locate` gives the `Segments` every mixer is called with; a `Cursor`
carries the running index and document id from one call to the next, so a
cached continuation numbers tokens as one long call would.
"""
import flax.struct
import jax
import jax.numpy as jnp

PAD_DOCUMENT = -1


@flax.struct.dataclass
class Cursor:
  next_index: jax.Array  # [B] int32: index in the row of the next token
  document: jax.Array    # [B] int32: document id of the last token seen

  @classmethod
  def create(cls, batch: int) -> 'Cursor':
    zeros = jnp.zeros((batch,), jnp.int32)
    return cls(next_index=zeros, document=zeros)


@flax.struct.dataclass
class Segments:
  """The place of a call's tokens, what every mixer is given besides its input (layers/blocks/residual.py)."""
  positions: jax.Array  # [B, T] int32: index in the document (restarts at 0; -1 on padding)
  index: jax.Array      # [B, T] int32: index in the row (a cached call continues it)
  document: jax.Array   # [B, T] int32: document id (PAD_DOCUMENT on padding)

  def last(self, n: int = 1) -> 'Segments':
    """The last n tokens' places only ([B, n] each)."""
    return jax.tree.map(lambda a: a[:, -n:], self)


def locate(positions: jax.Array, cursor: Cursor | None = None) -> tuple[Segments, Cursor]:
  """positions [B, T] -> their Segments (token index, document ids), the advanced cursor."""
  batch, length = positions.shape
  if cursor is None:
    cursor = Cursor.create(batch)
  token_index = cursor.next_index[:, None] + jnp.arange(length, dtype=jnp.int32)  # [B, T]
  running = cursor.document[:, None] + jnp.cumsum(positions == 0, axis=1, dtype=jnp.int32)  # [B, T]
  documents = jnp.where(positions < 0, PAD_DOCUMENT, running)
  advanced = Cursor(next_index=cursor.next_index + length, document=running[:, -1])
  return Segments(positions=positions, index=token_index, document=documents), advanced
