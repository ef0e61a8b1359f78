"""Per-split statistics: document lengths in tokens and byte-token counts.

One pass over the split gives both; they are cached in the dataset's folder
(`<dataset>/seqarch_stats/<split>.<feature>.npz`, written atomically) and in
memory, so packing and the unigram entropy cost one pass per split ever. A
read-only dataset folder just means no disk cache.
"""
import dataclasses
import logging
import os
import re
import tempfile
import threading

import numpy as np

from trainers.tokenizer import ByteTokenizer

_VOCAB = ByteTokenizer.vocab_size
_EOS = ByteTokenizer.eos_id
_MEMO: dict[tuple[str, str, str], 'SplitStats'] = {}
_MEMO_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class SplitStats:
  doc_lengths: np.ndarray  # int64[num_docs]: tokens per document, bytes + 1 (EOS).
  token_counts: np.ndarray  # int64[257]: how often each token id occurs (EOS once per document).

  @property
  def total_tokens(self) -> int:
    return int(self.doc_lengths.sum())

  def unigram_entropy_bits(self) -> float:
    """Entropy in bits/token of the unigram token distribution."""
    counts = self.token_counts[self.token_counts > 0].astype(np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def compute_stats(docs, chunk_bytes: int = 1 << 24) -> SplitStats:
  """One pass over `docs` (len() and [i] -> bytes)."""
  n = len(docs)
  lengths = np.zeros(n, np.int64)
  counts = np.zeros(_VOCAB, np.int64)
  pending, pending_bytes = [], 0
  for i in range(n):
    text = docs[i]
    lengths[i] = len(text) + 1
    pending.append(text)
    pending_bytes += len(text)
    if pending_bytes >= chunk_bytes or i == n - 1:
      data = np.frombuffer(b''.join(pending), np.uint8)
      counts[:256] += np.bincount(data, minlength=256)
      pending, pending_bytes = [], 0
  counts[_EOS] = n
  return SplitStats(lengths, counts)


def _cache_path(source) -> str | None:
  if not source.cache_dir:
    return None
  split = source.identity.rsplit('/', 1)[-1]
  safe = re.sub(r'[^\w.+-]', '_', f'{split}.{source.text_feature}')
  return os.path.join(source.cache_dir, 'seqarch_stats', f'{safe}.npz')


def _load(path: str, num_docs: int) -> SplitStats | None:
  try:
    with np.load(path, allow_pickle=False) as f:
      stats = SplitStats(f['doc_lengths'], f['token_counts'])
  except (OSError, KeyError, ValueError):
    return None
  ok = (stats.doc_lengths.shape == (num_docs,) and stats.token_counts.shape == (_VOCAB,)
        and stats.token_counts.sum() == stats.doc_lengths.sum())
  return stats if ok else None


def _save(path: str, stats: SplitStats) -> None:
  tmp = None
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, doc_lengths=stats.doc_lengths, token_counts=stats.token_counts)
    os.replace(tmp, path)
  except OSError as e:  # A read-only dataset folder: keep the result in memory only.
    logging.warning('Could not cache split statistics at %s: %s', path, e)
    if tmp and os.path.exists(tmp):
      os.remove(tmp)


def split_stats(source) -> SplitStats:
  """Statistics of a `sources.TextSource`, from memory, the disk cache, or one pass."""
  key = (source.identity, source.text_feature, source.cache_dir or '')
  with _MEMO_LOCK:
    if key in _MEMO:
      return _MEMO[key]
  path = _cache_path(source)
  stats = _load(path, len(source)) if path and os.path.exists(path) else None
  if stats is None:
    logging.info('Computing document lengths and token counts of %s (%d documents).',
                 source.identity, len(source))
    stats = compute_stats(source)
    if path:
      _save(path, stats)
  with _MEMO_LOCK:
    _MEMO[key] = stats
  return stats
