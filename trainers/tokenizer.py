"""Byte-level tokenizer: ids 0..255 are UTF-8 bytes, 256 is end-of-sequence.

The tokenizer of the codebase (every config here trains on bytes): no vocabulary
file, every string is representable, and `vocab_size` is 257.
"""
import numpy as np


class ByteTokenizer:
  """Maps text to its UTF-8 bytes (ids 0..255); `eos_id` (256) marks a document end."""

  eos_id = 256
  vocab_size = 257

  def encode(self, text: str | bytes) -> np.ndarray:
    """Returns the UTF-8 bytes of `text` as int32 ids (no EOS is added)."""
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    """Returns the text of `ids`; ids >= 256 (EOS) and negative ids are dropped."""
    ids = np.asarray(ids).reshape(-1)
    ids = ids[(ids >= 0) & (ids < 256)]
    return ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')
