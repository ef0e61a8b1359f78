"""The data interface of the trainer: training iterator, eval batches, unigram
entropy, and `describe` (what a run reads: the corpus, its build, the tokenizer,
documents and tokens per split, duplicates dropped, and the validation split's overlap
with training), which train logs and evaluate writes into eval.json.

Batches are `{'tokens', 'positions', 'token_bytes'}`, each int32[B_local, L+1]
(inputs `tokens[:, :-1]`, targets `tokens[:, 1:]`; positions restart at 0 at
each document start, -1 marks padding; token_bytes: how many bytes of its
document each token stands for, 0 for EOS and padding; eval batches only). Documents become ids of
the run's tokenizer (`config.tokenizer`: bytes, or a SentencePiece model whose
tokens of each split are built once, tokenized.py).

Training: global batch k is rows `[k*B, (k+1)*B)` of `PackedRows(train split,
seed=config.seed)`; process p of P takes rows `[k*B + p*B/P, k*B + (p+1)*B/P)`.
With `config.streaming.enabled`, rows come from `streaming.StreamRows`
instead: row j of every batch continues lane j's document stream.

Rows are read by grain with `config.dataset.num_threads` threads, keeping
`config.dataset.prefetch` batches ready. The iterator's state is the index of
the next global row (plus what identifies the stream), a small JSON dict; a
restored iterator continues exactly there, also with a different process
count.
"""
import logging
import math
from typing import Iterator

import grain
import ml_collections
import numpy as np

from trainers import tokenizer as tokenizer_lib
from trainers.data import local_text
from trainers.data import packing
from trainers.data import sources
from trainers.data import streaming
from trainers.data import synthetic
from trainers.data import timeseries
from trainers.data import stats as stats_lib
from trainers.data import tokenized

_ENDLESS = 1 << 62  # Rows per process: a grain range that never runs out.
_STATE_VERSION = 1


def _dataset_field(config, field, default):
  return config.dataset.get(field, default)


def _documents(config, split: str, tokenizer: tokenizer_lib.Tokenizer):
  """The documents of `split` of config.dataset as ids of `tokenizer`."""
  return tokenized.open_documents(sources.open_split(config.dataset, split), tokenizer)


def _check_batching(config, process_index: int, process_count: int) -> int:
  if config.seq_len < 1:
    raise ValueError(f'config.seq_len must be >= 1, got {config.seq_len}.')
  if config.batch_size < 1:
    raise ValueError(f'config.batch_size must be >= 1, got {config.batch_size}.')
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count={process_count}).')
  if config.batch_size % process_count:
    raise ValueError(
        f'config.batch_size={config.batch_size} is not divisible by the '
        f'process count {process_count}.')
  return config.batch_size // process_count


# Row fields only evaluation reads (bits per byte); training batches leave them out, so they are never copied
# to the devices on the training hot path.
EVAL_ONLY = ('token_bytes',)


class DataIterator:
  """Training batches of one process (rows without EVAL_ONLY fields); `get_state()` / `set_state()` for
  checkpoints."""

  def __init__(self, rows: packing.PackedRows, *, batch_size: int, process_index: int,
               process_count: int, num_threads: int, prefetch: int, identity: str):
    self._rows = rows
    self._batch_size = batch_size
    self._local_batch = batch_size // process_count
    self._process_index = process_index
    self._read_options = grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=max(1, prefetch) * self._local_batch)
    self._identity = identity
    self._iterator = None
    self._start(0)

  def _start(self, next_row: int) -> None:
    batch, local, first = self._batch_size, self._local_batch, self._process_index * self._local_batch
    rows = self._rows

    def read_row(j):  # j-th row of this process since `next_row`, without what the train step does not read
      k, m = divmod(j, local)
      row = rows[next_row + k * batch + first + m]
      return {key: value for key, value in row.items() if key not in EVAL_ONLY}

    self.close()
    dataset = (grain.MapDataset.range(_ENDLESS)
               .map(read_row)
               .to_iter_dataset(self._read_options)
               .batch(local, drop_remainder=True))
    self._iterator = iter(dataset)
    self._first_row = next_row
    self._batches_read = 0

  def close(self) -> None:
    """Stops the reader threads; a later `next()` restarts them where this left off."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:  # Closed: restart at the next row.
      self._start(self.get_state()['next_row'])
    batch = next(self._iterator)
    self._batches_read += 1
    return batch

  def get_state(self) -> dict:
    next_row = self._first_row + self._batches_read * self._batch_size
    return {
        'version': _STATE_VERSION,
        'next_row': next_row,
        'epoch': next_row // self._rows.rows_per_epoch,
        'seed': self._rows.seed,
        'seq_len': self._rows.seq_len,
        'dataset': self._identity,
    }

  def set_state(self, state: dict) -> None:
    mine = self.get_state()
    for key in ('version', 'seed', 'seq_len', 'dataset'):
      if state.get(key) != mine[key]:
        changed = (' The corpus changed since the checkpoint was written (adding, removing or editing a local '
                   "corpus's files builds a new snapshot): restore the files, or start a new --workdir."
                   if key == 'dataset' else '')
        raise ValueError(
            f'Data iterator state has {key}={state.get(key)!r} but this run has '
            f'{key}={mine[key]!r}: it is not a state of this data stream.{changed}')
    self._start(int(state['next_row']))


def make_train_iterator(config, *, process_index: int = 0, process_count: int = 1) -> DataIterator:
  """The endless, checkpointable training batches of this process (see module docstring)."""
  _check_batching(config, process_index, process_count)
  if config.dataset.name in synthetic.TASKS + timeseries.DATASETS:  # generated: endless, no corpus
    rows = (synthetic.task_rows if config.dataset.name in synthetic.TASKS else timeseries.series_rows)(config, 'train')
    return DataIterator(rows, batch_size=config.batch_size, process_index=process_index,
                        process_count=process_count, num_threads=_dataset_field(config, 'num_threads', 4),
                        prefetch=_dataset_field(config, 'prefetch', 2), identity=rows.identity)
  tokenizer = tokenizer_lib.from_config(config)
  docs = _documents(config, 'train', tokenizer)
  identity = docs.identity
  if config.get('streaming') and config.streaming.enabled:  # each row continues its own document stream
    rows = streaming.StreamRows(docs, docs.stats.doc_lengths, config.seq_len, lanes=config.batch_size,
                                seed=config.seed, eos_id=tokenizer.eos_id)
    identity += '/stream'
  else:
    rows = packing.PackedRows(docs, docs.stats.doc_lengths, config.seq_len, seed=config.seed,
                              eos_id=tokenizer.eos_id)
  return DataIterator(
      rows, batch_size=config.batch_size, process_index=process_index,
      process_count=process_count,
      num_threads=_dataset_field(config, 'num_threads', 4),
      prefetch=_dataset_field(config, 'prefetch', 2),
      identity=identity)


class EvalBatches:
  """What `make_eval_batches` returns: iterate once over the batches; len() is how many there are."""

  def __init__(self, batches: Iterator[dict[str, np.ndarray]], count: int):
    self._batches, self._count = batches, count

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self._batches

  def __len__(self) -> int:
    return self._count


def make_eval_batches(config, *, split: str = 'validation', num_batches: int | None = None,
                      batch_size: int | None = None, seq_len: int | None = None,
                      process_index: int = 0, process_count: int = 1) -> EvalBatches:
  """Deterministic batches over `split` in stored order (epoch 0, no shuffling).

  Every token after the first of the split is a target exactly once; the last
  row and the rows filling the last batch are padding (token 0, position -1).
  `num_batches=None` covers the split once; otherwise at most `num_batches`
  (fewer if the split ends first). `batch_size` (default `config.batch_size`)
  is global: process p of P gets its contiguous `batch_size // P` rows, as in
  training.
  """
  batch_size = config.batch_size if batch_size is None else batch_size
  seq_len = config.seq_len if seq_len is None else seq_len
  if batch_size < 1 or seq_len < 1:
    raise ValueError(f'Eval batch_size ({batch_size}) and seq_len ({seq_len}) must be >= 1.')
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count={process_count}).')
  if batch_size % process_count:
    raise ValueError(f'Eval batch_size={batch_size} (config.batch_size unless given) is not '
                     f'divisible by the process count {process_count}.')
  local = batch_size // process_count
  if config.dataset.name in synthetic.TASKS:  # endless: as many batches as asked (default: eval_batches)
    rows = synthetic.task_rows(config, split, seq_len)
    total = num_batches or config.get('eval_batches', 8)
  elif config.dataset.name in timeseries.DATASETS:  # the validation windows, once
    rows = timeseries.series_rows(config, split, seq_len)
    total = math.ceil(rows.rows_per_epoch / batch_size)
    if num_batches is not None:
      total = min(total, num_batches)
  else:
    tokenizer = tokenizer_lib.from_config(config)
    docs = _documents(config, split, tokenizer)
    rows = packing.PackedRows(docs, docs.stats.doc_lengths, seq_len, eos_id=tokenizer.eos_id,
                              shuffle=False, drop_remainder=False)
    total = math.ceil(rows.rows_per_epoch / batch_size)
    if num_batches is not None:
      total = min(total, num_batches)

  def batches():
    pad = {key: np.zeros_like(value) for key, value in rows[0].items()}  # padding rows: position -1
    pad['positions'][:] = packing.PAD_POSITION
    for k in range(total):
      first = k * batch_size + process_index * local
      got = [rows[r] if r < rows.rows_per_epoch else pad for r in range(first, first + local)]
      yield {key: np.stack([row[key] for row in got]) for key in got[0]}

  return EvalBatches(batches(), total)


def corpus_unigram_entropy_bits(config, split: str = 'train') -> float | None:
  """Entropy (bits/token) of the split's unigram distribution of the run's tokens, EOS included
  (None for a synthetic task or a time series, which have no corpus)."""
  if config.dataset.name in synthetic.TASKS + timeseries.DATASETS:
    return None
  return _documents(config, split, tokenizer_lib.from_config(config)).stats.unigram_entropy_bits()


def pin_build(config, data_state: dict):
  """`config` reading the local corpus build that a checkpoint's data position (`data_state`) was read from,
  where the corpus's files changed since: evaluate then scores the validation split the run held out, never a
  split of the current files, which may hold documents it trained on. Any other config comes back unchanged."""
  if config.dataset.name not in sources.LOCAL_CORPORA:
    return config
  trained = data_state['dataset'].split('/')[1].split(':')[0]  # '<name>/<build>:<version>/<split>[/stream]'
  current = sources.local_builder(config.dataset).builder_config
  if trained == current.name or not local_text.same_files(trained, current.name):
    return config
  logging.warning('the files under %s changed since the run trained on them (build %s, now %s): evaluating the '
                  'build it trained on', current.root, trained, current.name)
  pinned = ml_collections.ConfigDict(config.to_dict())
  pinned.dataset.build = trained
  return pinned


def describe(config) -> dict:
  """The dataset of `config` as a run reads it (see the module docstring); JSON-serialisable."""
  name = config.dataset.name
  if name in synthetic.TASKS + timeseries.DATASETS:
    return dict(name=name, generated=True)
  tokenizer = tokenizer_lib.from_config(config)
  splits = {split: _documents(config, split, tokenizer) for split in ('train', 'validation')}
  train, validation = splits['train'].source, splits['validation'].source
  description = dict(name=name, build=train.identity.rsplit('/', 1)[0], tokenizer=tokenizer.identity, **train.build)
  for split, docs in splits.items():
    description[split] = dict(documents=len(docs), tokens=docs.stats.total_tokens)
  description['overlap'] = stats_lib.overlap(train, validation)
  return description


def summarize(description: dict) -> str:
  """`describe`'s dict as one line for the log."""
  if description.get('generated'):
    return f"{description['name']} (generated)"
  text = f"{description['name']} ({description['build']}{', ' + description['path'] if 'path' in description else ''})"
  if description.get('tokenizer', tokenizer_lib.BYTES) != tokenizer_lib.BYTES:
    text += f" in tokens of {description['tokenizer']}"
  text += ''.join(f"; {split} {description[split]['documents']:,} documents, {description[split]['tokens']:,} tokens"
                  for split in ('train', 'validation'))
  if 'files' in description:
    text += f"; {description['duplicate_files_dropped']:,} of {description['files']:,} files dropped as copies"
  if description.get('not_text_files'):
    text += f"; {description['not_text_files']:,} documents mostly not UTF-8 text"
  overlap = description['overlap']
  if 'skipped' in overlap:
    return text + f"; overlap not measured: {overlap['skipped']}"
  return text + (f"; validation vs train: {overlap['identical_to_train']} identical documents, "
                 f"{overlap['lines_in_train']:,} of {overlap['validation_lines']:,} lines over "
                 f"{overlap['line_min_chars']} bytes ({100 * overlap['line_overlap']:.1f}%) found verbatim in train")
