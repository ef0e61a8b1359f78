"""PackedRows: a deterministic random-access view of packed training rows.

For epoch e the documents are permuted with `np.random.default_rng([seed, e])`,
each becomes its tokens + EOS, and they are concatenated into one stream of
T tokens. Row r of the epoch is `stream[r*L : r*L + L + 1]` (stride L, one
token of overlap), so every stream token after the first is a target exactly
once; the trailing `(T - 1) % L` targets of an epoch are dropped. The rows
of the epoch are then permuted by the same generator, so that a batch does not
hold neighbouring chunks of one document. Row i of the infinite sequence is
row `i % rows_per_epoch` of epoch `i // rows_per_epoch`.

`positions` count from 0 at each document start; a document continued from the
previous row keeps counting. `token_bytes` holds how many bytes of its
document each token stands for (EOS and padding: 0), so that bits per byte
sums them over the counted targets. With `shuffle=False, drop_remainder=False`
(for evaluation) the order is the stored one and the last row is padded with
token 0 at position -1.

Only per-epoch arrays (document order, offsets, row order) live in memory;
documents are read from the source by index, with a small LRU of recent ones.
"""
import collections
import threading

import numpy as np

PAD_TOKEN = 0
PAD_POSITION = -1


class _Epoch:
  """Document order, stream offsets and row order of one epoch."""

  def __init__(self, order, offsets, row_order):
    self.order = order  # int[num_docs]: stream slot -> document index.
    self.offsets = offsets  # int64[num_docs + 1]: stream start of each slot.
    self.row_order = row_order  # int[rows_per_epoch] or None: row -> stream chunk.


class PackedRows:
  """`rows[i] -> {'tokens', 'positions', 'token_bytes'}`, each int32[L+1], for any i >= 0."""

  def __init__(self, docs, doc_lengths, seq_len: int, seed: int = 0, *, eos_id: int,
               shuffle: bool = True, shuffle_rows: bool | None = None, drop_remainder: bool = True,
               cache_docs: int = 256, cache_epochs: int = 2):
    """Args:
      docs: `len(docs)` and `docs[i] -> (ids, token_bytes)` of a document, without EOS
        (`tokenized.open_documents`).
      doc_lengths: int[len(docs)], tokens per document with its EOS.
      seq_len: L; rows hold L + 1 tokens.
      seed: non-negative integer.
      eos_id: the tokenizer's end of document, appended to each.
      shuffle: permute documents and rows per epoch (training) or not (eval).
      shuffle_rows: permute rows (default: as `shuffle`); False keeps each
        epoch's rows in stream order, as long-document streaming needs.
      drop_remainder: drop the last partial row of an epoch (else pad it).
      cache_docs: how many decoded documents to keep.
      cache_epochs: how many epochs' order arrays to keep.
    """
    self.docs = docs
    self.doc_lengths = np.asarray(doc_lengths, np.int64)
    self.seq_len = int(seq_len)
    self.seed = int(seed)
    self.eos_id = int(eos_id)
    self.shuffle = shuffle
    self.shuffle_rows = shuffle if shuffle_rows is None else shuffle_rows
    if self.seq_len < 1:
      raise ValueError(f'seq_len must be >= 1, got {seq_len}.')
    if self.seed < 0:
      raise ValueError(f'seed must be >= 0, got {seed}.')
    if len(docs) != len(self.doc_lengths):
      raise ValueError(f'{len(docs)} documents but {len(self.doc_lengths)} lengths.')
    self.total_tokens = int(self.doc_lengths.sum())
    if drop_remainder:
      if self.total_tokens < self.seq_len + 1:
        raise ValueError(
            f'The split has {self.total_tokens} tokens, fewer than one row of '
            f'seq_len + 1 = {self.seq_len + 1}: use a smaller config.seq_len or a larger corpus.')
      self.rows_per_epoch = (self.total_tokens - 1) // self.seq_len
    else:
      if self.total_tokens < 2:
        raise ValueError(f'The split has {self.total_tokens} tokens; a row needs at least 2.')
      self.rows_per_epoch = -(-(self.total_tokens - 1) // self.seq_len)
    self._lock = threading.Lock()
    self._docs_cache = collections.OrderedDict()
    self._cache_docs = cache_docs
    self._epochs = collections.OrderedDict()
    self._cache_epochs = cache_epochs

  def _epoch(self, epoch: int) -> _Epoch:
    with self._lock:
      if epoch in self._epochs:
        self._epochs.move_to_end(epoch)
        return self._epochs[epoch]
    n = len(self.doc_lengths)
    if self.shuffle:
      rng = np.random.default_rng([self.seed, epoch])
      order = rng.permutation(n)
      row_order = rng.permutation(self.rows_per_epoch) if self.shuffle_rows else None
    else:
      order, row_order = np.arange(n), None
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(self.doc_lengths[order], out=offsets[1:])
    state = _Epoch(order, offsets, row_order)
    with self._lock:
      self._epochs[epoch] = state
      while len(self._epochs) > self._cache_epochs:
        self._epochs.popitem(last=False)
    return state

  def _doc(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    with self._lock:
      if index in self._docs_cache:
        self._docs_cache.move_to_end(index)
        return self._docs_cache[index]
    ids, token_bytes = self.docs[index]
    if len(ids) + 1 != self.doc_lengths[index]:
      raise RuntimeError(
          f'Document {index} has {len(ids)} tokens but its cached length is '
          f'{self.doc_lengths[index] - 1}: delete the stale seqarch_stats (or seqarch_tokens) cache.')
    with self._lock:
      self._docs_cache[index] = ids, token_bytes
      while len(self._docs_cache) > self._cache_docs:
        self._docs_cache.popitem(last=False)
    return ids, token_bytes

  def row_offsets(self, epoch: int) -> np.ndarray:
    """Stream offset of each row of `epoch`, in row order."""
    state = self._epoch(epoch)
    chunks = state.row_order if state.row_order is not None else np.arange(self.rows_per_epoch)
    return chunks.astype(np.int64) * self.seq_len

  def row(self, epoch: int, r: int) -> dict[str, np.ndarray]:
    """Row `r` (0 <= r < rows_per_epoch) of `epoch`."""
    state = self._epoch(epoch)
    chunk = int(state.row_order[r]) if state.row_order is not None else int(r)
    width = self.seq_len + 1
    start = chunk * self.seq_len
    stop = min(start + width, self.total_tokens)
    tokens = np.full(width, PAD_TOKEN, np.int32)
    positions = np.full(width, PAD_POSITION, np.int32)
    token_bytes = np.zeros(width, np.int32)
    slot = int(np.searchsorted(state.offsets, start, side='right')) - 1
    g = start
    while g < stop:
      doc_start, doc_end = int(state.offsets[slot]), int(state.offsets[slot + 1])
      lo, hi = g - doc_start, min(stop, doc_end) - doc_start  # Within the document.
      ids, doc_bytes = self._doc(int(state.order[slot]))
      out = g - start
      body_hi = min(hi, len(ids))  # Token len(ids) of a document is its EOS (0 bytes).
      tokens[out:out + body_hi - lo] = ids[lo:body_hi]
      token_bytes[out:out + body_hi - lo] = doc_bytes[lo:body_hi]
      if hi > len(ids):
        tokens[out + hi - lo - 1] = self.eos_id
      positions[out:out + hi - lo] = np.arange(lo, hi, dtype=np.int32)
      g = doc_start + hi
      slot += 1
    return {'tokens': tokens, 'positions': positions, 'token_bytes': token_bytes}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if index < 0:
      raise IndexError(f'Row index must be >= 0, got {index}.')
    epoch, r = divmod(index, self.rows_per_epoch)
    return self.row(epoch, r)
