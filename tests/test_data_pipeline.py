"""Tests of the data pipeline: local tfds corpora, packing, grain iterators (no JAX)."""
import json
import logging
import os
import pathlib
import re
import sys
import threading
import time

import ml_collections
import numpy as np
import pytest

from trainers import data
from trainers.data import local_text
from trainers.data import packing
from trainers.data import sources
from trainers.data import stats
from trainers.data import tokenized
from trainers.tokenizer import ByteTokenizer

EOS = ByteTokenizer.eos_id
TOK = ByteTokenizer()
SEQ_LEN = 64
BATCH = 4


def _make_corpus(root: pathlib.Path) -> dict[str, bytes]:
  """Writes a small nested corpus; returns {relative path: bytes} of the files that count."""
  rng = np.random.default_rng(1234)
  words = ['alpha', 'beta', 'gamma', 'déjà', 'vu', '日本', 'def', 'return', '\n', '  ', '# x', '✓']
  files = {}
  names = ([f'notes/n{i}.txt' for i in range(5)] + [f'docs/deep/d{i}.md' for i in range(4)]
           + [f'src/m{i}.py' for i in range(5)] + ['top.txt'])
  for i, name in enumerate(names):
    n_words = int(rng.integers(20, 300))
    text = f'# file {i}: {name}\n' + ' '.join(rng.choice(words, n_words))
    files[name] = text.encode('utf-8')
  for name, content in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(content)
  # Files that must be ignored: hidden, unmatched extension, empty.
  (root / '.hidden').mkdir()
  (root / '.hidden' / 'secret.txt').write_text('hidden')
  (root / 'blob.bin').write_bytes(b'\x00\x01')
  (root / 'empty.txt').write_bytes(b'')
  return files


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  return root, _make_corpus(root)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def _config(corpus_dir, data_dir, **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      seed=0, seq_len=SEQ_LEN, batch_size=BATCH,
      dataset=dict(name='local_text', path=str(corpus_dir),
                   patterns=local_text.DEFAULT_PATTERNS, data_dir=str(data_dir),
                   validation_fraction=0.2, text_feature='text', num_threads=0, prefetch=2)))
  for key, value in overrides.items():
    if key.startswith('dataset.'):
      config.dataset[key.split('.', 1)[1]] = value
    else:
      config[key] = value
  return config


@pytest.fixture(scope='module')
def config(corpus, data_dir):
  return _config(corpus[0], data_dir)


def _split_files(config, split):
  """(paths, texts) of a split, in stored order."""
  source = sources.open_split(config.dataset, split)
  paths = [source.data_source[i]['path'].decode() for i in range(len(source))]
  return paths, [source[i] for i in range(len(source))]


def _packed(config, split='train', **kwargs):
  docs = tokenized.open_documents(sources.open_split(config.dataset, split), TOK)
  return packing.PackedRows(docs, docs.stats.doc_lengths, config.seq_len, seed=config.seed, eos_id=EOS, **kwargs)


def _expected_stream(texts, seed, epoch):
  """The epoch's token stream and positions, built straight from the specification."""
  order = np.random.default_rng([seed, epoch]).permutation(len(texts))
  tokens = np.concatenate([np.append(TOK.encode(texts[i]), EOS) for i in order])
  positions = np.concatenate([np.arange(len(texts[i]) + 1) for i in order])
  return tokens, positions


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


TRAIN_KEYS, EVAL_KEYS = {'tokens', 'positions'}, {'tokens', 'positions', 'token_bytes'}  # bytes: eval only


def _assert_batches_equal(a, b, keys=TRAIN_KEYS):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() == keys
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# --- Building ------------------------------------------------------------------


def test_build_splits_are_disjoint_complete_and_exact(config, corpus):
  _, files = corpus
  train_paths, train_texts = _split_files(config, 'train')
  val_paths, val_texts = _split_files(config, 'validation')
  assert val_paths and train_paths
  assert not set(train_paths) & set(val_paths)
  assert set(train_paths) | set(val_paths) == set(files)  # Hidden/.bin/empty files excluded.
  assert train_paths == sorted(train_paths)  # Stored order: sorted paths.
  for path, text in zip(train_paths + val_paths, train_texts + val_texts):
    assert text == files[path]


def test_config_name_identifies_directory_and_patterns(corpus, tmp_path):
  root, _ = corpus
  a = local_text.directory_config(str(root))
  assert a.name == local_text.directory_config(str(root) + '/./').name
  assert a.name != local_text.directory_config(str(root), ('**/*.txt',)).name
  assert a.name != local_text.directory_config(str(tmp_path)).name
  assert a.name != local_text.directory_config(str(root), validation_fraction=0.1).name
  major, minor = sys.version_info[:2]
  assert f'py{major}_{minor}' in local_text.stdlib_config().name


@pytest.mark.parametrize('n', [2, 3, 7, 40])
def test_validation_never_empty(n):
  paths = [f'f{i}.txt' for i in range(n)]
  for fraction in (1e-4, 0.05, 0.9999):
    splits = local_text.assign_splits(paths, fraction)
    assert splits['train'] and splits['validation']
    assert sorted(splits['train'] + splits['validation']) == sorted(paths)
  assert local_text.assign_splits(paths, 0.3) == local_text.assign_splits(list(reversed(paths)), 0.3)


def test_concurrent_builds_build_once_and_completely(corpus, tmp_path):
  root, files = corpus
  results, errors = [], []

  def build():
    try:
      builder = local_text.prepare(local_text.builder_for('local_text', data_dir=str(tmp_path), path=str(root)))
      results.append(sum(s.num_examples for s in builder.info.splits.values()))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=build) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  assert results == [len(files), len(files)]
  leftovers = [p for p in tmp_path.rglob('*') if 'incomplete' in p.name]
  assert not leftovers


@pytest.mark.fault('a local_text directory in which many files are byte-identical (licence texts under many names)',
                   "each content is stored once, in one split; the build logs how many files it dropped; "
                   "data.describe reports them and the validation split's overlap with training (identical "
                   'documents, lines over 20 bytes seen verbatim)')
def test_identical_files_are_one_document_and_the_overlap_is_reported(tmp_path, caplog):
  """Issue 30.2: licence files copied under many names went to both splits; now each content is stored once,
  the build says how many files it dropped, and describe() reports what validation shares with training."""
  corpus = tmp_path / 'corpus'
  licence = b'Permission is hereby granted, free of charge, to any person obtaining a copy\n' * 3
  for i in range(12):
    (corpus / f'pkg{i:02d}').mkdir(parents=True)
    (corpus / f'pkg{i:02d}' / 'copyright.txt').write_bytes(licence)
    (corpus / f'own{i:02d}.txt').write_bytes(f'file {i:02d}, a line of its own words\n'.encode() * 2
                                             + b'    this line is shared by every own file\n')
  caplog.set_level(logging.INFO)
  config = _config(corpus, tmp_path / 'tfds', **{'dataset.validation_fraction': 0.3})
  (train_paths, train_texts), (val_paths, val_texts) = (_split_files(config, s) for s in ('train', 'validation'))
  assert len(train_texts + val_texts) == len(set(train_texts + val_texts)) == 13
  assert 'pkg00/copyright.txt' in train_paths + val_paths  # the first path of the copies
  assert '11 of 24 files have the same bytes as another file' in caplog.text
  description = data.describe(config)
  assert (description['files'], description['duplicate_files_dropped']) == (24, 11)
  assert description['validation']['documents'] == len(val_texts)
  train_lines = {line.strip() for text in train_texts for line in text.split(b'\n')}
  val_lines = [line.strip() for text in val_texts for line in text.split(b'\n') if len(line.strip()) > 20]
  assert description['overlap'] == dict(
      validation_documents=len(val_texts), identical_to_train=0, validation_lines=len(val_lines),
      lines_in_train=sum(line in train_lines for line in val_lines),
      line_overlap=pytest.approx(sum(line in train_lines for line in val_lines) / len(val_lines)),
      line_min_chars=20)
  assert description['overlap']['lines_in_train'] > 0  # the shared line


@pytest.mark.fault('files added to and edited in a local_text directory after it was built',
                   'the next use builds a new snapshot (the build is named by a manifest of paths, sizes and '
                   'modification times) and logs that the files changed')
def test_a_changed_directory_is_built_again(tmp_path, caplog):
  """Issue 30.3: files added to a directory already built were ignored; now the build's name holds a manifest
  (paths, sizes, modification times), so a changed directory builds a new snapshot and says so."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(4):
    (corpus / f'f{i}.txt').write_text(f'document {i} ' * 20)
  config = _config(corpus, tmp_path / 'tfds', **{'dataset.validation_fraction': 0.3})
  texts = lambda: sorted(t for split in ('train', 'validation') for t in _split_files(config, split)[1])
  before = texts()
  (corpus / 'f4.txt').write_text('a new document ' * 20)
  (corpus / 'f0.txt').write_text('an edited one  ' * 20)
  caplog.set_level(logging.INFO)
  after = texts()
  assert after == sorted([*before[1:], b'a new document ' * 20, b'an edited one  ' * 20])
  assert 'changed since the build' in caplog.text


def test_empty_local_dir_is_a_clear_error(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'ignored.bin').write_bytes(b'xyz')
  config = _config(empty, tmp_path / 'tfds')
  with pytest.raises(ValueError, match=r"config\.dataset\.path=.*empty.*\*\*/\*\.txt"):
    data.make_train_iterator(config)


def test_missing_catalog_dataset_is_a_clear_error(tmp_path):
  for name in ('pg19', 'no_such_dataset_xyz'):
    config = _config('', tmp_path, **{'dataset.name': name})
    with pytest.raises(data.DatasetNotPreparedError,
                       match=rf"(?s){name}.*{re.escape(str(tmp_path))}.*tfds build {name} "
                             r"--file_format=array_record.*config\.dataset\.data_dir"):
      data.make_train_iterator(config)


def test_catalog_name_reads_a_prepared_dataset(config, data_dir):
  """A prepared array_record dataset is read by name through tfds, as pg19 would be."""
  build_name = local_text.directory_config(config.dataset.path, validation_fraction=0.2).name
  catalog = _config('', data_dir, **{'dataset.name': f'local_text/{build_name}'})
  local = _split_files(config, 'validation')[1]  # builds it first where this test runs first (alone, or -n 2)
  assert _split_files(catalog, 'validation')[1] == local
  with pytest.raises(ValueError, match='config.dataset.text_feature'):
    sources.open_split(_config('', data_dir, **{'dataset.name': f'local_text/{build_name}',
                                                'dataset.text_feature': 'book_text'}).dataset, 'train')


# --- Packing -------------------------------------------------------------------


@pytest.mark.parametrize('epoch', [0, 1])
def test_rows_follow_the_spec_and_cover_each_target_once(config, epoch):
  _, texts = _split_files(config, 'train')
  rows = _packed(config)
  length = config.seq_len
  stream, stream_positions = _expected_stream(texts, config.seed, epoch)
  assert rows.total_tokens == len(stream)
  assert rows.rows_per_epoch == (len(stream) - 1) // length
  offsets = rows.row_offsets(epoch)
  np.testing.assert_array_equal(np.sort(offsets), np.arange(rows.rows_per_epoch) * length)
  assert not np.array_equal(offsets, np.sort(offsets))  # Rows are shuffled.
  targets = {}
  for r, offset in enumerate(offsets):
    row = rows[epoch * rows.rows_per_epoch + r]
    assert row['tokens'].dtype == row['positions'].dtype == np.int32
    np.testing.assert_array_equal(row['tokens'], stream[offset:offset + length + 1])
    np.testing.assert_array_equal(row['positions'], stream_positions[offset:offset + length + 1])
    targets[int(offset)] = row['tokens'][1:]
  all_targets = np.concatenate([targets[o] for o in sorted(targets)])
  np.testing.assert_array_equal(all_targets, stream[1:rows.rows_per_epoch * length + 1])


def test_rows_decode_to_the_files_and_positions_restart_at_documents(config):
  _, texts = _split_files(config, 'train')
  rows = _packed(config)
  offsets = rows.row_offsets(0)
  by_offset = {int(o): rows[r] for r, o in enumerate(offsets)}
  # Rebuild the stream from the rows alone (each row overlaps the next by one token).
  chunks = [by_offset[o] for o in sorted(by_offset)]
  tokens = np.concatenate([chunks[0]['tokens']] + [c['tokens'][1:] for c in chunks[1:]])
  positions = np.concatenate([chunks[0]['positions']] + [c['positions'][1:] for c in chunks[1:]])
  starts = np.flatnonzero(positions == 0)
  expected_starts = np.concatenate([[0], np.flatnonzero(tokens[:-1] == EOS) + 1])
  np.testing.assert_array_equal(starts, expected_starts)
  step = np.diff(positions)
  assert np.all((step == 1) | (positions[1:] == 0))
  # Every complete document decodes back to exactly one training file.
  ends = np.flatnonzero(tokens == EOS)
  decoded = [TOK.decode(tokens[s:e]) for s, e in zip(starts, ends)]
  assert len(decoded) >= len(texts) - 1  # Only the dropped tail may be missing.
  assert all(d in texts for d in decoded)
  assert len(set(decoded)) == len(decoded)


def test_epochs_differ_in_order(config):
  rows = _packed(config)
  per_epoch = rows.rows_per_epoch
  first = np.stack([rows[i]['tokens'] for i in range(per_epoch)])
  second = np.stack([rows[per_epoch + i]['tokens'] for i in range(per_epoch)])
  assert not np.array_equal(first, second)
  assert not np.array_equal(rows.row_offsets(0), rows.row_offsets(1))


def test_split_smaller_than_a_row_is_an_error(config):
  with pytest.raises(ValueError, match='fewer than one row'):
    data.make_train_iterator(_config(config.dataset.path, config.dataset.data_dir, seq_len=10**6))


# --- Training iterator ---------------------------------------------------------


def test_batches_are_global_rows_and_process_slices_concatenate(config):
  rows = _packed(config)
  whole = _take(data.make_train_iterator(config), 6)
  for k, batch in enumerate(whole):
    assert batch['tokens'].shape == batch['positions'].shape == (BATCH, SEQ_LEN + 1)
    expected = [rows[k * BATCH + m] for m in range(BATCH)]
    np.testing.assert_array_equal(batch['tokens'], np.stack([e['tokens'] for e in expected]))
    np.testing.assert_array_equal(batch['positions'], np.stack([e['positions'] for e in expected]))
  halves = [_take(data.make_train_iterator(config, process_index=p, process_count=2), 6)
            for p in range(2)]
  for k, batch in enumerate(whole):
    for key in batch:
      assert halves[0][k][key].shape == (BATCH // 2, SEQ_LEN + 1)
      np.testing.assert_array_equal(np.concatenate([halves[0][k][key], halves[1][k][key]]), batch[key])


def test_seed_determines_the_batches(config):
  a = _take(data.make_train_iterator(config), 3)
  b = _take(data.make_train_iterator(config), 3)
  _assert_batches_equal(a, b)
  other = _take(data.make_train_iterator(_config(config.dataset.path, config.dataset.data_dir, seed=1)), 3)
  assert not np.array_equal(a[0]['tokens'], other[0]['tokens'])


@pytest.mark.parametrize('num_threads', [0, 3])
def test_resume_from_state_yields_the_same_next_batches(config, num_threads):
  threaded = _config(config.dataset.path, config.dataset.data_dir,
                     **{'dataset.num_threads': num_threads, 'dataset.prefetch': 3})
  rows_per_epoch = _packed(config).rows_per_epoch
  it = data.make_train_iterator(threaded)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  assert state['next_row'] == 5 * BATCH
  # Cross an epoch boundary after the checkpoint.
  n_next = rows_per_epoch // BATCH + 3
  expected = _take(it, n_next)
  resumed = data.make_train_iterator(threaded)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, n_next), expected)
  assert resumed.get_state() == it.get_state()
  assert it.get_state()['epoch'] == 1
  # Rewinding an iterator in use works too, and so does closing it.
  it.set_state(state)
  _assert_batches_equal(_take(it, 2), expected[:2])
  it.close()
  _assert_batches_equal(_take(it, 2), expected[2:4])


def test_resume_on_a_different_process_count(config):
  it = data.make_train_iterator(config)
  _take(it, 3)
  state = it.get_state()
  expected = next(it)
  halves = []
  for p in range(2):
    part = data.make_train_iterator(config, process_index=p, process_count=2)
    part.set_state(state)
    halves.append(next(part))
  np.testing.assert_array_equal(np.concatenate([h['tokens'] for h in halves]), expected['tokens'])


def test_state_of_another_stream_is_rejected(config):
  state = data.make_train_iterator(config).get_state()
  other = data.make_train_iterator(_config(config.dataset.path, config.dataset.data_dir, seed=7))
  with pytest.raises(ValueError, match='seed'):
    other.set_state(state)


def test_batch_not_divisible_by_processes_is_an_error(config):
  with pytest.raises(ValueError, match=r'config\.batch_size'):
    data.make_train_iterator(_config(config.dataset.path, config.dataset.data_dir, batch_size=5),
                             process_count=2)


# --- Evaluation and statistics ------------------------------------------------


def test_eval_batches_are_deterministic_complete_and_padded(config):
  _, texts = _split_files(config, 'validation')
  batches = list(data.make_eval_batches(config, batch_size=3, seq_len=32))
  _assert_batches_equal(batches, list(data.make_eval_batches(config, batch_size=3, seq_len=32)), EVAL_KEYS)
  stream = np.concatenate([np.append(TOK.encode(t), EOS) for t in texts])
  tokens = np.concatenate([b['tokens'] for b in batches])
  positions = np.concatenate([b['positions'] for b in batches])
  assert tokens.shape[1] == 33 and all(b['tokens'].shape == (3, 33) for b in batches)
  valid = positions >= 0
  # Targets (column 1 onwards) of real tokens are the stored stream after its first token, once.
  targets = np.concatenate([row[1:][mask[1:]] for row, mask in zip(tokens, valid)])
  np.testing.assert_array_equal(targets, stream[1:])
  np.testing.assert_array_equal(tokens[0][:33], stream[:33])
  # Padding is at the end only, with position -1.
  flat = valid.reshape(-1)
  first_pad = np.argmin(flat) if not flat.all() else len(flat)
  assert not flat.all() and not flat[first_pad:].any()
  assert (positions[~valid] == -1).all()
  assert not valid[-1].any()  # The last batch ends with a whole padding row here.
  assert len(list(data.make_eval_batches(config, batch_size=3, seq_len=32, num_batches=2))) == 2
  # Processes take contiguous slices of each global eval batch.
  halves = [list(data.make_eval_batches(config, batch_size=4, seq_len=32, process_index=p, process_count=2))
            for p in range(2)]
  whole = list(data.make_eval_batches(config, batch_size=4, seq_len=32))
  assert len(halves[0]) == len(halves[1]) == len(whole)
  for a, b, w in zip(*halves, whole):
    np.testing.assert_array_equal(np.concatenate([a['positions'], b['positions']]), w['positions'])


def test_eval_padding_row_fills_last_batch(config):
  rows = _packed(config, 'validation', shuffle=False, drop_remainder=False)
  n = -(-rows.rows_per_epoch // BATCH)
  batches = list(data.make_eval_batches(config))
  assert len(batches) == n
  pad_rows = n * BATCH - rows.rows_per_epoch
  if pad_rows:
    assert (batches[-1]['positions'][-pad_rows:] == -1).all()


def test_unigram_entropy_matches_numpy(config):
  _, texts = _split_files(config, 'train')
  ids = np.concatenate([np.append(TOK.encode(t), EOS) for t in texts])
  p = np.bincount(ids, minlength=257) / len(ids)
  p = p[p > 0]
  expected = float(-(p * np.log2(p)).sum())
  assert data.corpus_unigram_entropy_bits(config) == pytest.approx(expected, rel=1e-12)
  # Served from the cache next to the dataset afterwards.
  source = sources.open_split(config.dataset, 'train')
  assert os.path.exists(stats._cache_path(source))


# --- The embedded default corpus -----------------------------------------------


@pytest.fixture(scope='module')
def stdlib_config(tmp_path_factory):
  config = ml_collections.ConfigDict(dict(
      seed=0, seq_len=256, batch_size=8,
      dataset=dict(name='python_stdlib', path='', patterns=('**/*.py',),
                   data_dir=str(tmp_path_factory.mktemp('tfds_stdlib')), validation_fraction=0.05,
                   text_feature='text', num_threads=2, prefetch=2)))
  start = time.perf_counter()
  sources.open_split(config.dataset, 'train')
  print(f'\npython_stdlib build: {time.perf_counter() - start:.2f} s')
  return config


def test_python_stdlib_corpus(stdlib_config):
  train_paths, train_texts = _split_files(stdlib_config, 'train')
  val_paths, _ = _split_files(stdlib_config, 'validation')
  assert len(train_paths) > 300 and len(val_paths) > 5
  assert not set(train_paths) & set(val_paths)
  for path in train_paths + val_paths:
    parts = path.split('/')
    assert path.endswith('.py')
    assert not {'site-packages', 'test', 'tests', 'idlelib'} & set(parts[:-1])
  assert 'os.py' in train_paths + val_paths
  assert sum(map(len, train_texts)) > 2_000_000
  batch = next(data.make_train_iterator(stdlib_config))
  assert batch['tokens'].shape == (8, 257)
  entropy = data.corpus_unigram_entropy_bits(stdlib_config)
  print(f'python_stdlib train unigram entropy: {entropy:.4f} bits/token')
  assert 3.5 < entropy < 6.0
