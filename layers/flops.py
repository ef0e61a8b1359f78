"""Forward FLOPs of the work a mixer does, MaxText-style: 2 per multiply-add, causal attention halved.

Attention work is counted from the documents actually in the rows: a query sees
the keys of its own document only (clipped to a window), so rows of several
documents cost less than one of the same length. `lengths` is one document's
length (an int: every row is one document) or the documents' lengths laid end
to end, row after row.
"""
from collections.abc import Sequence

import numpy as np

Lengths = int | Sequence[int] | np.ndarray


def token_offsets(lengths: Lengths) -> np.ndarray:
  """Each token's index in its document, for documents of `lengths` laid end to end."""
  lengths = np.atleast_1d(np.asarray(lengths, np.int64))
  starts = np.cumsum(lengths) - lengths
  return np.arange(int(lengths.sum())) - np.repeat(starts, lengths)


def mean_visible_keys(lengths: Lengths, window: int = 0) -> float:
  """Average number of keys a causal query sees (itself included) in its document; window 0 = global."""
  seen = token_offsets(lengths) + 1
  if window:
    seen = np.minimum(seen, window)
  return float(seen.mean())


def attention_flops(num_heads: int, head_dim: int, visible_keys: float) -> float:
  """q k^T and p v per query: 2 x 2 x heads x head_dim x the keys it sees."""
  return 2 * 2 * num_heads * head_dim * visible_keys


def document_lengths(seq_len: int, doc_lengths: Lengths | None) -> Lengths:
  """The documents to count attention over: `doc_lengths`, or one document of seq_len a row."""
  return seq_len if doc_lengths is None else doc_lengths
