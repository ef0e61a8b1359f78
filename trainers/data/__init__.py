"""Data pipeline: local tfds corpora, their splits as ids of the run's tokenizer, packed rows, grain iterators.

The trainer uses only what is exported here (see `pipeline.py`):
`make_train_iterator`, `make_eval_batches`, `corpus_unigram_entropy_bits`,
`describe`, `summarize`, `pin_build`.
"""
from trainers.data import synthetic
from trainers.data.pipeline import DataIterator
from trainers.data.pipeline import corpus_unigram_entropy_bits
from trainers.data.pipeline import describe
from trainers.data.pipeline import make_eval_batches
from trainers.data.pipeline import make_train_iterator
from trainers.data.pipeline import pin_build
from trainers.data.pipeline import summarize
from trainers.data.sources import DatasetNotPreparedError

__all__ = [
    'DataIterator',
    'DatasetNotPreparedError',
    'corpus_unigram_entropy_bits',
    'describe',
    'make_eval_batches',
    'make_train_iterator',
    'pin_build',
    'summarize',
    'synthetic',
]
