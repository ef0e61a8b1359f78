"""Trains a SentencePiece tokenizer on the training split of a corpus:

  python -m experiments.train_tokenizer --output=/tmp/seqarch/stdlib_4k.model --vocab_size=4096
  python -m experiments.train_tokenizer --input=/some/dir --output=dir.model --model_type=bpe

--input is the embedded corpus (python_stdlib, the default) or a directory of text files, read as
config.dataset.name='local_text' reads it (--patterns; the same build and split, built on first use), so the
validation split stays unseen. Train with the model through --config.tokenizer=<output> and a
config.model.vocab_size at least its vocabulary (the log says both). The model round-trips every UTF-8 text
(trainers/tokenizer_training.py); the log reports its bytes per token on the validation split.
"""
import numpy as np
from absl import flags, logging
from ml_collections import ConfigDict

from experiments import flag_parsing
from trainers import paths
from trainers import tokenizer as tokenizer_lib
from trainers.data import local_text, sources
from trainers.tokenizer_training import MODEL_TYPES, train_sentencepiece

EMBEDDED = 'python_stdlib'

_INPUT = flags.DEFINE_string('input', EMBEDDED, f'{EMBEDDED!r} (the embedded corpus) or a directory of text files.')
_OUTPUT = flags.DEFINE_string('output', None, 'Where to write the SentencePiece model file (.model).', required=True)
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 4096, 'Pieces in the vocabulary (at least the 256 byte pieces, '
                                   '3 special ids, the newline and the common characters).', lower_bound=1)
_MODEL_TYPE = flags.DEFINE_enum('model_type', 'unigram', MODEL_TYPES, 'SentencePiece algorithm.')
_PATTERNS = flags.DEFINE_list('patterns', list(local_text.DEFAULT_PATTERNS), 'Files of a directory --input.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', "tfds data_dir of the corpus build ('' = ~/tensorflow_datasets).")
_MAX_BYTES = flags.DEFINE_integer('max_bytes', 0, 'Train on about this many bytes of documents, taken in a '
                                  'random order (0 = the whole training split).', lower_bound=0)
_SEED = flags.DEFINE_integer('seed', 0, 'Order in which documents are read (what --max_bytes takes).')


def main():
  embedded = _INPUT.value == EMBEDDED
  dataset = ConfigDict(dict(name=EMBEDDED if embedded else 'local_text', path='' if embedded else _INPUT.value,
                            patterns=tuple(_PATTERNS.value), data_dir=_DATA_DIR.value))
  train = sources.open_split(dataset, 'train')
  order = np.random.default_rng(_SEED.value).permutation(len(train))
  model = train_sentencepiece((train[i] for i in order), vocab_size=_VOCAB_SIZE.value,
                              model_type=_MODEL_TYPE.value, max_bytes=_MAX_BYTES.value)
  output = paths.as_path(_OUTPUT.value)
  output.parent.mkdir(parents=True, exist_ok=True)
  paths.write_bytes_atomically(output, model)
  tokenizer = tokenizer_lib.load(str(output), '--output')
  validation = sources.open_split(dataset, 'validation')
  documents = [validation[i] for i in range(len(validation))]
  tokens = sum(len(tokenizer.encode(document)) for document in documents)
  logging.info('wrote %s: %s pieces of %s (%s); %.2f bytes per token on the %d validation documents. Train with '
               '--config.tokenizer=%s and --config.model.vocab_size=%d (or more)', output, tokenizer.vocab_size,
               _MODEL_TYPE.value, tokenizer.identity, sum(map(len, documents)) / max(tokens, 1), len(documents),
               output, tokenizer.vocab_size)


if __name__ == '__main__':
  flag_parsing.run(main)
