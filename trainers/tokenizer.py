"""Tokenizers: `config.tokenizer` is 'bytes' (the default) or the path of a SentencePiece model file.

Every tokenizer has the same interface (`Tokenizer`): `encode(text) -> ids`, `encode_with_bytes(text) -> (ids,
bytes per id)`, `decode(ids) -> bytes`, `vocab_size`, `eos_id` (the end of every document), `bos_id` (None
where there is none; only released models that were trained with one want it before a prompt), and `identity`
('bytes', or 'sentencepiece_<hash of the model file>'), which keys tokenized corpora, data positions and
workdirs: runs with different tokenizers never share data or checkpoints.

Bytes per id: how many bytes of the document each token stands for (a byte token 1; a SentencePiece token the
bytes of the text it covers, `trainers/sentencepiece_tokenizer.py`); they sum to the document's length, so
bits per byte (summed nats / ln 2 / summed bytes) compares byte and subword runs. End of document: 0 bytes.

Padding is marked by position -1 (trainers/data/packing.py, the sampler's left padding): its token is 0, a
valid id of every vocabulary, and no loss or byte count includes it; `decode` drops padding, BOS and EOS.
"""
from typing import Protocol

import numpy as np
from etils import epath
from ml_collections import ConfigDict

from trainers import paths

BYTES = 'bytes'


class Tokenizer(Protocol):
  """What the data pipeline, the evaluator and the samplers use of a tokenizer."""

  identity: str
  description: str  # for messages: 'the byte tokenizer', 'the SentencePiece model <path> (config.tokenizer)'
  vocab_size: int
  eos_id: int
  bos_id: int | None

  def encode(self, text: str | bytes) -> np.ndarray:
    """int32 ids of `text` (a str is encoded as UTF-8), no BOS or EOS."""

  def encode_with_bytes(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
    """(ids, the bytes of `text` each id stands for); the bytes sum to len(text as UTF-8)."""

  def decode(self, ids) -> bytes:
    """The bytes of `ids` (padding, BOS, EOS and ids outside the vocabulary dropped)."""


class ByteTokenizer:
  """Maps text to its UTF-8 bytes (ids 0..255); `eos_id` (256) marks a document end."""

  identity = BYTES
  eos_id = 256
  bos_id = None
  vocab_size = 257
  description = 'the byte tokenizer'

  def encode(self, text: str | bytes) -> np.ndarray:
    """Returns the UTF-8 bytes of `text` as int32 ids (no EOS is added)."""
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def encode_with_bytes(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
    """The ids of `encode`, each standing for 1 byte."""
    ids = self.encode(text)
    return ids, np.ones(len(ids), np.int32)

  def decode(self, ids) -> bytes:
    """Returns the bytes of `ids`; ids >= 256 (EOS) and negative ids are dropped."""
    ids = np.asarray(ids).reshape(-1)
    return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()


def load(spec: str, field: str = 'config.tokenizer') -> Tokenizer:
  """The tokenizer `spec` names: 'bytes', or a SentencePiece model file (local or any filesystem etils.epath
  knows). A missing file, a file that is no SentencePiece model or one without an end-of-sequence piece is a
  ValueError of one line naming `field`."""
  if spec == BYTES:
    return ByteTokenizer()
  path = paths.as_path(spec) if spec else epath.Path('')
  if not spec or not path.is_file():
    raise ValueError(f"{field}={spec!r}: no such file (the path of a SentencePiece model, e.g. from "
                     f"experiments.train_tokenizer, or {BYTES!r})")
  try:
    from trainers import sentencepiece_tokenizer  # pylint: disable=g-import-not-at-top: an optional package
  except ImportError as error:
    raise ValueError(f"{field}={spec!r} needs the sentencepiece package (pip install -e '.[tokenizers]'): "
                     f'{error}') from error
  return sentencepiece_tokenizer.SentencePieceTokenizer(path.read_bytes(), str(path), field)


def from_config(config: ConfigDict) -> Tokenizer:
  """The tokenizer of `config` (`config.tokenizer`; 'bytes' where a config has no such field)."""
  return load(config.get('tokenizer', BYTES))
