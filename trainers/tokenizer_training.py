"""Trains a SentencePiece model on documents (experiments/train_tokenizer.py is its binary).

The settings make a model that gives back every UTF-8 text byte for byte: identity normalisation (no NFKC), no
dummy space prefix, whitespace kept as it is (runs of spaces may be pieces: indentation), byte fallback (a
character outside the vocabulary is spelled by its UTF-8 bytes, pieces <0x00>..<0xFF>), digits split one by
one, and a newline a piece of its own. Ids: 0 padding, 1 end of sequence, 2 unknown (byte fallback never
produces it), no BOS. The vocabulary therefore needs room for the 256 byte pieces, these 3, the newline and the
corpus's common characters (SentencePiece names the shortfall).

SentencePiece reads sentences: each line of each document is one (with its newline); lines over
MAX_LINE_BYTES are skipped, and of more than MAX_LINES lines it samples MAX_LINES.
"""
import io
import os
from collections.abc import Iterable, Iterator

import sentencepiece

MODEL_TYPES = ('unigram', 'bpe')
MAX_LINE_BYTES = 1 << 14
MAX_LINES = 5_000_000


def _lines(documents: Iterable[bytes], max_bytes: int) -> Iterator[str]:
  """Each line of each document (UTF-8, invalid bytes as U+FFFD) with its newline; at most `max_bytes`
  bytes of documents (0: all)."""
  read = 0
  for document in documents:
    if max_bytes and read >= max_bytes:
      return
    read += len(document)
    lines = document.decode('utf-8', errors='replace').split('\n')
    yield from (line + '\n' for line in lines[:-1])
    if lines[-1]:
      yield lines[-1]


def train_sentencepiece(documents: Iterable[bytes], *, vocab_size: int, model_type: str = 'unigram',
                        max_bytes: int = 0) -> bytes:
  """The bytes of a SentencePiece model file trained on `documents` (the first `max_bytes` of them; 0: all).

  The vocabulary may come out smaller than `vocab_size` where the text has too few distinct pieces.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f'model_type={model_type!r}: one of {MODEL_TYPES}')
  model = io.BytesIO()
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=_lines(documents, max_bytes), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, normalization_rule_name='identity', add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, byte_fallback=True, split_digits=True,
        user_defined_symbols=['\n'], character_coverage=0.9995, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        max_sentence_length=MAX_LINE_BYTES, input_sentence_size=MAX_LINES, shuffle_input_sentence=True,
        hard_vocab_limit=False, num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as error:  # 'INTERNAL: <file>(<line>) [<check>] <what went wrong>'
    raise ValueError(f'SentencePiece training (vocab_size={vocab_size}) failed: '
                     f'{str(error).split("] ", 1)[-1].strip()}') from error
  return model.getvalue()

