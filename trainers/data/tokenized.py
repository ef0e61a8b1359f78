"""A split's documents as token ids of the run's tokenizer, with the bytes each token stands for.

`open_documents(source, tokenizer)` -> `docs`: `len(docs)`, `docs[i] -> (ids, token_bytes)` (the document's
tokens without EOS, and how many of its bytes each stands for: they sum to the document's length),
`docs.stats` (`stats.SplitStats`: tokens per document with EOS, and the unigram counts), `docs.identity`
(what a data position and a cache are keyed by) and `docs.source` (the text).

* bytes: the stored bytes are the ids; nothing is built, and the identity is the source's (as before there
  were tokenizers: earlier runs resume).
* a SentencePiece model: the split is tokenized once into `<dataset>/seqarch_tokens/<tokenizer
  identity>/<split>.<feature>.{ids,token_bytes,offsets}.npy`, written atomically (offsets last, so a
  half-written build is built again) and memory-mapped; the tokenizer identity (a hash of the model file) names
  the folder and ends the split's identity, so a byte build and a subword build, or two models, never mix. A
  read-only dataset folder keeps the tokens in memory.
"""
import logging
import os
import threading
import time

import numpy as np

from trainers.data import sources
from trainers.data import stats as stats_lib
from trainers.tokenizer import BYTES, Tokenizer

Document = tuple[np.ndarray, np.ndarray]
_ARRAYS = ('ids', 'token_bytes', 'offsets')
_MEMO: dict[tuple[str, str, str], 'TokenizedDocuments'] = {}
_MEMO_LOCK = threading.Lock()


class ByteDocuments:
  """The documents of `source` as byte tokens: each stored byte is an id standing for 1 byte."""

  def __init__(self, source: sources.TextSource):
    self.source = source
    self.identity = source.identity

  @property
  def stats(self) -> stats_lib.SplitStats:
    return stats_lib.split_stats(self.source)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> Document:
    data = np.frombuffer(self.source[index], np.uint8)
    return data, np.broadcast_to(np.uint8(1), data.shape)


class TokenizedDocuments:
  """The documents of `source` tokenized once by a SentencePiece model (see the module docstring)."""

  def __init__(self, source: sources.TextSource, tokenizer: Tokenizer):
    self.source = source
    self.identity = f'{source.identity}/{tokenizer.identity}'
    arrays = _load_or_build(source, tokenizer)
    self._ids, self._token_bytes, self._offsets = (arrays[name] for name in _ARRAYS)
    counts = np.bincount(self._ids, minlength=tokenizer.vocab_size).astype(np.int64)
    counts[tokenizer.eos_id] += len(source)
    self.stats = stats_lib.SplitStats(np.diff(self._offsets) + 1, counts)

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, index: int) -> Document:
    start, stop = self._offsets[index], self._offsets[index + 1]
    return self._ids[start:stop], self._token_bytes[start:stop]


def open_documents(source: sources.TextSource, tokenizer: Tokenizer) -> ByteDocuments | TokenizedDocuments:
  """The documents of `source` as ids of `tokenizer` (tokenized once per split and tokenizer, then memoized)."""
  if tokenizer.identity == BYTES:
    return ByteDocuments(source)
  key = (source.identity, tokenizer.identity, source.cache_dir or '')
  with _MEMO_LOCK:
    if key not in _MEMO:
      _MEMO[key] = TokenizedDocuments(source, tokenizer)
    return _MEMO[key]


def _paths(source: sources.TextSource, tokenizer: Tokenizer) -> dict[str, str] | None:
  if not source.cache_dir:
    return None
  folder = os.path.join(source.cache_dir, 'seqarch_tokens', tokenizer.identity)
  return {name: os.path.join(folder, f'{stats_lib.split_file_stem(source)}.{name}.npy') for name in _ARRAYS}


def _load(paths: dict[str, str]) -> dict[str, np.ndarray] | None:
  """The stored arrays, memory-mapped, or None where they are missing or do not fit together."""
  try:
    arrays = {name: np.load(path, mmap_mode='r', allow_pickle=False) for name, path in paths.items()}
  except (OSError, ValueError):
    return None
  total = int(arrays['offsets'][-1]) if len(arrays['offsets']) else -1
  return arrays if len(arrays['ids']) == len(arrays['token_bytes']) == total else None


def _tokenize(source: sources.TextSource, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
  """One pass over `source`: every document's ids and token bytes, concatenated, and the document offsets."""
  logging.info('tokenizing %s with %s (%d documents; once, then read from its cache)', source.identity,
               tokenizer.identity, len(source))
  start = time.perf_counter()
  ids, token_bytes = [], []
  offsets = np.zeros(len(source) + 1, np.int64)
  for i in range(len(source)):
    document_ids, document_bytes = tokenizer.encode_with_bytes(source[i])
    ids.append(document_ids)
    token_bytes.append(document_bytes)
    offsets[i + 1] = offsets[i] + len(document_ids)
  token_bytes = np.concatenate(token_bytes) if token_bytes else np.zeros(0, np.int32)
  arrays = dict(ids=np.concatenate(ids).astype(np.min_scalar_type(tokenizer.vocab_size - 1)),
                token_bytes=token_bytes.astype(np.min_scalar_type(token_bytes.max(initial=0))), offsets=offsets)
  logging.info('tokenized %s: %d tokens for %d bytes (%.2f bytes per token) in %.1f s', source.identity,
               offsets[-1], token_bytes.sum(), token_bytes.sum() / max(offsets[-1], 1), time.perf_counter() - start)
  return arrays


def _load_or_build(source: sources.TextSource, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
  paths = _paths(source, tokenizer)
  if paths and (arrays := _load(paths)) is not None:
    return arrays
  arrays = _tokenize(source, tokenizer)
  if paths:
    for name in _ARRAYS:  # offsets last: the others are complete once it exists
      stats_lib.write_atomically(paths[name], lambda f, array=arrays[name]: np.save(f, array))
    arrays = _load(paths) or arrays  # memory-mapped where the folder took them
  return arrays
