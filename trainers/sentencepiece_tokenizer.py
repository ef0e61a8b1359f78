"""A SentencePiece model file as a tokenizer (the interface of trainers/tokenizer.py).

Bytes per id come from the offsets SentencePiece reports into the encoded bytes: token i stands for the bytes
from its start to the next token's start (the first from 0, the last to the end), so they add up to the length
of the text whatever the model's normaliser does (a dummy space prefix, NFKC, invalid UTF-8 read as U+FFFD). A
character spelled by several byte-fallback pieces counts on the piece that completes it (the others stand for
0 bytes). A model trained by experiments.train_tokenizer (identity normalisation, byte fallback) decodes every
UTF-8 text back to exactly its bytes; Gemma's released tokenizer does too.
"""
import hashlib

import numpy as np
import sentencepiece


class SentencePieceTokenizer:
  """`model`: the bytes of a SentencePiece model file; `path` and `field` (the config field or flag that
  named it) appear in messages."""

  def __init__(self, model: bytes, path: str, field: str = 'config.tokenizer'):
    processor = sentencepiece.SentencePieceProcessor()
    try:
      processor.LoadFromSerializedProto(model)
    except RuntimeError:
      processor = None
    if processor is None or processor.vocab_size() < 1:
      raise ValueError(f'{field}={path!r}: not a SentencePiece model (the file does not parse as one)')
    if processor.eos_id() < 0:
      raise ValueError(f'{field}={path!r}: the SentencePiece model has no end-of-sequence piece (eos_id), which '
                       'ends every document; a model from experiments.train_tokenizer has one')
    self._processor = processor
    self.model = model
    self.identity = 'sentencepiece_' + hashlib.sha256(model).hexdigest()[:12]
    self.vocab_size = processor.vocab_size()
    self.eos_id = processor.eos_id()
    self.bos_id = processor.bos_id() if processor.bos_id() >= 0 else None
    self.description = f'the SentencePiece model {path} ({field})'

  def encode(self, text: str | bytes) -> np.ndarray:
    """int32 ids of `text`, no BOS or EOS."""
    return np.asarray(self._processor.encode(text), np.int32)

  def encode_with_bytes(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
    """(ids, bytes each id stands for) of `text` (str: as UTF-8); see the module docstring."""
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    pieces = self._processor.encode(data, return_type='proto').pieces
    ids = np.fromiter((piece.id for piece in pieces), np.int32, len(pieces))
    starts = np.fromiter((piece.begin for piece in pieces), np.int64, len(pieces))
    if len(starts):
      starts[0] = 0
    return ids, np.diff(starts, append=len(data)).astype(np.int32)

  def decode(self, ids) -> bytes:
    """The bytes of `ids`; ids outside the vocabulary are dropped, and SentencePiece drops its control pieces
    (padding, BOS, EOS)."""
    ids = np.asarray(ids).reshape(-1)
    return self._processor.decode(ids[(ids >= 0) & (ids < self.vocab_size)].tolist(), out_type=bytes)
