"""Per-split statistics of byte tokens: document lengths and token counts; and
how much of the validation split the training split already holds.

One pass over the split gives both; they are cached in the dataset's folder
(`<dataset>/seqarch_stats/<split>.<feature>.npz`, written atomically) and in
memory, so packing and the unigram entropy cost one pass per split ever. A
read-only dataset folder just means no disk cache.

`overlap` counts validation documents byte-identical to a training document
and validation lines (stripped, over OVERLAP_MIN_LINE_CHARS bytes) found
verbatim in training: what held-out numbers are worth. It is cached next to
the split statistics (`overlap.<feature>.json`) and skipped for a training
split over OVERLAP_MAX_TRAIN_BYTES.
"""
import dataclasses
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator

import numpy as np

from trainers.tokenizer import ByteTokenizer

_VOCAB = ByteTokenizer.vocab_size
_EOS = ByteTokenizer.eos_id
_MEMO: dict[tuple[str, str, str], 'SplitStats'] = {}
_MEMO_LOCK = threading.Lock()
OVERLAP_MIN_LINE_CHARS = 20
OVERLAP_MAX_TRAIN_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class SplitStats:
  """Of a split's documents as tokens (`compute_stats` for bytes; trainers/data/tokenized.py for subwords)."""

  doc_lengths: np.ndarray  # int64[num_docs]: tokens per document, its EOS included (bytes + 1 for bytes).
  token_counts: np.ndarray  # int64[vocabulary]: how often each token id occurs (EOS once per document).

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


def split_file_stem(source) -> str:
  """'<split>.<text feature>' of a `sources.TextSource`, as a file name: what its caches are named after."""
  return re.sub(r'[^\w.+-]', '_', f"{source.identity.rsplit('/', 1)[-1]}.{source.text_feature}")


def _cache_path(source) -> str | None:
  if not source.cache_dir:
    return None
  return os.path.join(source.cache_dir, 'seqarch_stats', f'{split_file_stem(source)}.npz')


def _load(path: str, num_docs: int) -> SplitStats | None:
  try:
    with np.load(path, allow_pickle=False) as f:
      stats = SplitStats(f['doc_lengths'], f['token_counts'])
  except (OSError, KeyError, ValueError):
    return None
  ok = (stats.doc_lengths.shape == (num_docs,) and stats.token_counts.shape == (_VOCAB,)
        and stats.token_counts.sum() == stats.doc_lengths.sum())
  return stats if ok else None


def write_atomically(path: str, write) -> None:
  """write(binary file) into a temporary file renamed to `path`; a read-only folder only logs a warning."""
  tmp = None
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
    with os.fdopen(fd, 'wb') as f:
      write(f)
    os.replace(tmp, path)
  except OSError as e:  # A read-only dataset folder: keep the result in memory only.
    logging.warning('Could not cache %s: %s', path, e)
    if tmp and os.path.exists(tmp):
      os.remove(tmp)


def _save(path: str, stats: SplitStats) -> None:
  write_atomically(path, lambda f: np.savez(f, doc_lengths=stats.doc_lengths, token_counts=stats.token_counts))


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


def _lines(doc: bytes) -> Iterator[bytes]:
  return (line for line in (raw.strip() for raw in doc.split(b'\n')) if len(line) > OVERLAP_MIN_LINE_CHARS)


def compute_overlap(train, validation) -> dict:
  """One pass over each split (len() and [i] -> bytes); hashes stand for documents and lines."""
  train_docs, train_lines = set(), set()
  for i in range(len(train)):
    doc = train[i]
    train_docs.add(hash(doc))
    train_lines.update(hash(line) for line in _lines(doc))
  identical = lines = seen = 0
  for i in range(len(validation)):
    doc = validation[i]
    identical += hash(doc) in train_docs
    for line in _lines(doc):
      lines += 1
      seen += hash(line) in train_lines
  return dict(validation_documents=len(validation), identical_to_train=identical,
              validation_lines=lines, lines_in_train=seen, line_overlap=seen / lines if lines else 0.0,
              line_min_chars=OVERLAP_MIN_LINE_CHARS)


def overlap(train, validation) -> dict:
  """`compute_overlap` of two `sources.TextSource`s, from the disk cache or one pass over each."""
  if split_stats(train).total_tokens > OVERLAP_MAX_TRAIN_BYTES:
    return dict(skipped=f'the training split is over {OVERLAP_MAX_TRAIN_BYTES >> 30} GiB')
  path = None
  if train.cache_dir:
    name = re.sub(r'[^\w.+-]', '_', f'overlap.{train.text_feature}.json')
    path = os.path.join(train.cache_dir, 'seqarch_stats', name)
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, ValueError):  # not computed yet (or unreadable): compute it
      pass
  logging.info('Comparing the validation split with the training split (%d and %d documents).',
               len(validation), len(train))
  result = compute_overlap(train, validation)
  if path:
    write_atomically(path, lambda f: f.write(json.dumps(result).encode('utf-8')))
  return result
