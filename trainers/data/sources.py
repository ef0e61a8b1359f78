"""Opens one split of the configured corpus as random-access documents (bytes).

`config.dataset.name` picks the corpus:
* 'python_stdlib' / 'local_text': built on first use by `local_text.py`
  (`config.dataset.build`, which only evaluate sets, via `pipeline.pin_build`:
  an earlier snapshot of the same files, read instead of the current files);
* anything else: a tfds catalog name (pg19, lm1b, wiki40b/en, or
  'local_text/<config>' of an earlier build) that must already be prepared in
  array_record format under `config.dataset.data_dir`; it is read with
  `tfds.data_source` and never downloaded here.
"""
import dataclasses
import os
from typing import Any

import tensorflow_datasets as tfds

from trainers.data import local_text

LOCAL_CORPORA = ('python_stdlib', 'local_text')


class DatasetNotPreparedError(FileNotFoundError):
  """A tfds catalog dataset is not available in array_record form under data_dir."""


@dataclasses.dataclass
class TextSource:
  """Documents of one split: `len(source)`, `source[i] -> bytes` (random access)."""

  data_source: Any  # A tfds data source: len() and [i] -> feature dict.
  text_feature: str
  identity: str  # e.g. 'python_stdlib/py3_11_val0500:1.0.0/train', for states and caches.
  cache_dir: str | None  # Where derived statistics may be cached (the dataset folder).
  build: dict = dataclasses.field(default_factory=dict)  # A local build's root path, files, duplicates dropped.

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> bytes:
    value = self.data_source[int(index)][self.text_feature]
    return value.encode('utf-8') if isinstance(value, str) else bytes(value)


def _get(dataset_config, field, default):
  return dataset_config.get(field, default) if hasattr(dataset_config, 'get') else default


def _how_to_get(name: str, data_dir: str) -> str:
  where = data_dir or '~/tensorflow_datasets (the tfds default)'
  return (
      f"tfds dataset {name!r} is not prepared in array_record format under "
      f"data_dir={where}. Build it on a machine with TensorFlow and network "
      f"access: `tfds build {name} --file_format=array_record "
      f"--data_dir=<dir>`, copy <dir> here if needed, then pass "
      f"--config.dataset.data_dir=<dir>. (No download is attempted here; for "
      f"a corpus that needs nothing, use --config.dataset.name=python_stdlib or "
      f"local_text.)")


def _open_catalog(name: str, split: str, data_dir: str, text_feature: str) -> TextSource:
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # Unknown name, or a builder whose code needs TensorFlow.
    raise DatasetNotPreparedError(_how_to_get(name, data_dir) + f' [{type(e).__name__}: {str(e)[:200]}]') from e
  if not builder.is_prepared():
    raise DatasetNotPreparedError(_how_to_get(name, data_dir))
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError as e:  # Prepared, but as tfrecord.
    raise DatasetNotPreparedError(
        _how_to_get(name, data_dir) + ' (It exists there in another file format; '
        'rebuild it with --file_format=array_record.)') from e
  features = builder.info.features
  if text_feature not in features:
    raise ValueError(
        f'config.dataset.text_feature={text_feature!r} is not a feature of '
        f'{name!r}; its features are {sorted(features.keys())}.')
  return TextSource(source, text_feature,
                    identity=f'{builder.name}/{builder.builder_config.name if builder.builder_config else ""}'
                    f':{builder.version}/{split}',
                    cache_dir=os.fspath(builder.data_path))


def local_builder(dataset_config) -> local_text.LocalText:
  """The (not necessarily prepared) builder of a local corpus: of its files as they are now, or of
  `config.dataset.build` where set."""
  return local_text.builder_for(
      dataset_config.name,
      data_dir=_get(dataset_config, 'data_dir', '') or '',
      path=_get(dataset_config, 'path', ''),
      patterns=tuple(_get(dataset_config, 'patterns', local_text.DEFAULT_PATTERNS)),
      validation_fraction=_get(dataset_config, 'validation_fraction', local_text.DEFAULT_VALIDATION_FRACTION),
      build=_get(dataset_config, 'build', ''))


def open_split(dataset_config, split: str) -> TextSource:
  """Opens `split` of the corpus named by `config.dataset` (building local corpora on first use)."""
  name = dataset_config.name
  data_dir = _get(dataset_config, 'data_dir', '') or ''
  if name in LOCAL_CORPORA:
    builder = local_text.prepare(local_builder(dataset_config))
    return TextSource(
        builder.as_data_source(split=split), 'text',
        identity=f'{builder.name}/{builder.builder_config.name}:{builder.version}/{split}',
        cache_dir=os.fspath(builder.data_path),
        build=dict(builder.info.metadata or {}, path=builder.builder_config.root))
  return _open_catalog(name, split, data_dir, _get(dataset_config, 'text_feature', 'text') or 'text')
