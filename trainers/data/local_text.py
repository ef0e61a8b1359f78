"""tfds builders for text corpora read from local files: one example = one file.

* `PythonStdlib` (`config.dataset.name='python_stdlib'`, the embedded default):
  the `.py` files of the running Python's standard library, without
  `site-packages`, `test`/`tests` folders and `idlelib`. Needs no network.
* `LocalText` (`config.dataset.name='local_text'`): every file under
  `config.dataset.path` matching `config.dataset.patterns`.

Both write array_record files (no TensorFlow needed) with the features
`{'text': Text, 'path': Text}` (file bytes as stored, relative POSIX path) and
the splits `train` / `validation`. Files with the same bytes are one document:
each content is stored once, under its first path in sorted order, so no
document is in both splits (the build logs how many files it dropped and
records it in the dataset's metadata, `duplicate_files_dropped`). Documents
that are mostly not UTF-8 text (binary files named .txt) are trained on as the
bytes they are; the build warns how many (metadata `not_text_files`). The split of
a document is chosen by a stable hash of that path. Examples are stored in
sorted path order (`disable_shuffling`).

The builder config name identifies the files it was built from: Python
major.minor for the stdlib, a hash of the resolved directory and patterns for
a local directory, then a hash of the file manifest (every matching file's
path, size and modification time), then the validation fraction. A build is a
snapshot of those files: adding, removing or editing one changes the manifest,
so the next use builds a new snapshot (and says so) instead of reading a
stale one.

`prepare(builder)` builds on first use, under a file lock so that concurrent
processes build once; tfds itself writes into a temporary folder that is
renamed at the end, so an interrupted build never looks complete.
"""
import contextlib
import dataclasses
import fnmatch
import hashlib
import logging
import os
import pathlib
import sys
import sysconfig

from etils import epath
import tensorflow_datasets as tfds

DEFAULT_PATTERNS = ('**/*.txt', '**/*.md', '**/*.py')
DEFAULT_VALIDATION_FRACTION = 0.05
STDLIB_PATTERNS = ('**/*.py',)
STDLIB_EXCLUDED_DIRS = ('site-packages', 'test', 'tests', 'idlelib')


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  """Which files make the corpus and how they are split."""

  root: str = ''
  patterns: tuple[str, ...] = DEFAULT_PATTERNS
  exclude_dirs: tuple[str, ...] = ()
  validation_fraction: float = DEFAULT_VALIDATION_FRACTION
  manifest: str = ''  # `manifest_digest` of the files when the config was made


def list_files(root: str | os.PathLike, patterns, exclude_dirs=()) -> list[str]:
  """Relative POSIX paths of the non-empty regular files under `root` matching a pattern.

  Paths with a hidden component (`.git/`, `.venv/`, `.x.txt`) or a folder named
  in `exclude_dirs` are skipped (and not walked into: the stdlib's
  site-packages can be large). Sorted, without duplicates.
  """
  root = pathlib.Path(root)
  found = set()
  anywhere = {p for p in patterns if p.startswith('**/') and '/' not in p[3:]}  # '**/*.py': a name anywhere
  for folder, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if not d.startswith('.') and d not in exclude_dirs]
    for name in names:
      if any(fnmatch.fnmatchcase(name, pattern[3:]) for pattern in anywhere):
        found.add(pathlib.Path(folder, name).relative_to(root))
  for pattern in sorted(set(patterns) - anywhere):
    for path in root.glob(pattern):
      rel = path.relative_to(root)
      if not any(p.startswith('.') for p in rel.parts) and not any(p in exclude_dirs for p in rel.parts[:-1]):
        found.add(rel)
  return sorted(rel.as_posix() for rel in found
                if not rel.name.startswith('.') and (root / rel).is_file() and (root / rel).stat().st_size > 0)


def manifest_digest(root: str | os.PathLike, relpaths: list[str]) -> str:
  """12 hex digits identifying the files' paths, sizes and modification times (a changed file changes it)."""
  digest = hashlib.sha256()
  for rel in relpaths:
    stat = (pathlib.Path(root) / rel).stat()
    digest.update(f'{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode('utf-8'))
  return digest.hexdigest()[:12]


def unique_contents(root: str | os.PathLike, relpaths: list[str]) -> tuple[list[str], list[str]]:
  """(kept, dropped): the first path (in the given order) of each distinct file content, and the others."""
  first: dict[bytes, str] = {}
  dropped = []
  for rel in relpaths:
    digest = hashlib.sha256((pathlib.Path(root) / rel).read_bytes()).digest()
    if digest in first:
      dropped.append(rel)
    else:
      first[digest] = rel
  return list(first.values()), dropped


_CONTROL_BYTES = bytes(b for b in range(32) if chr(b) not in '\t\n\r\f\v') + b'\x7f'


def mostly_not_text(data: bytes) -> bool:
  """Whether at least half of `data` is invalid UTF-8 or control bytes (a binary file, or UTF-16)."""
  invalid = data.decode('utf-8', errors='replace').count('\ufffd')
  control = len(data) - len(data.translate(None, _CONTROL_BYTES))
  return 2 * (invalid + control) >= len(data) > 0


def _unit_hash(relpath: str) -> float:
  """A stable value in [0, 1) from the path (independent of PYTHONHASHSEED)."""
  digest = hashlib.sha256(relpath.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def assign_splits(relpaths, validation_fraction: float) -> dict[str, list[str]]:
  """Splits paths into train / validation by a stable hash of each path.

  With two or more paths both splits are non-empty: if the hash gives no
  validation path the lowest-hash path moves to validation (and if it gives
  no train path, the highest-hash one moves to train).
  """
  relpaths = sorted(relpaths)
  h = {p: _unit_hash(p) for p in relpaths}
  val = {p for p in relpaths if h[p] < validation_fraction}
  if len(relpaths) >= 2:
    if not val:
      val = {min(relpaths, key=h.get)}
    if len(val) == len(relpaths):
      val.discard(max(relpaths, key=h.get))
  return {
      'train': [p for p in relpaths if p not in val],
      'validation': [p for p in relpaths if p in val],
  }


def _fraction_tag(validation_fraction: float) -> str:
  # Basis points: 0.05 -> 'val0500'.
  return f'val{round(validation_fraction * 10000):04d}'


def _check_fraction(validation_fraction: float) -> float:
  validation_fraction = float(validation_fraction)
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(
        'config.dataset.validation_fraction must be in (0, 1), got '
        f'{validation_fraction}.')
  return validation_fraction


def stdlib_config(validation_fraction=DEFAULT_VALIDATION_FRACTION) -> LocalTextConfig:
  """The config of the running Python's standard library corpus."""
  validation_fraction = _check_fraction(validation_fraction)
  major, minor = sys.version_info[:2]
  root = sysconfig.get_paths()['stdlib']
  manifest = manifest_digest(root, list_files(root, STDLIB_PATTERNS, STDLIB_EXCLUDED_DIRS))
  return LocalTextConfig(
      name=f'py{major}_{minor}_{manifest}_{_fraction_tag(validation_fraction)}',
      description=f'.py files of the Python {major}.{minor} standard library.',
      root=root,
      patterns=STDLIB_PATTERNS,
      exclude_dirs=STDLIB_EXCLUDED_DIRS,
      validation_fraction=validation_fraction,
      manifest=manifest,
  )


def directory_config(path, patterns=DEFAULT_PATTERNS,
                     validation_fraction=DEFAULT_VALIDATION_FRACTION) -> LocalTextConfig:
  """The config of a local directory; its name hashes the resolved path and patterns."""
  validation_fraction = _check_fraction(validation_fraction)
  if not path:
    raise ValueError("config.dataset.path must name a directory for dataset 'local_text'.")
  if isinstance(patterns, str):
    patterns = (patterns,)
  patterns = tuple(patterns)
  if not patterns:
    raise ValueError('config.dataset.patterns must hold at least one glob pattern.')
  root = pathlib.Path(path).expanduser().resolve()
  key = '\n'.join([str(root), *patterns]).encode('utf-8')
  digest = hashlib.sha256(key).hexdigest()[:12]
  manifest = manifest_digest(root, list_files(root, patterns))
  return LocalTextConfig(
      name=f'dir_{digest}_{manifest}_{_fraction_tag(validation_fraction)}',
      description=f'Files {list(patterns)} under {root}.',
      root=str(root),
      patterns=patterns,
      validation_fraction=validation_fraction,
      manifest=manifest,
  )


class LocalText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Text files of a local directory, one example per file."""

  name = 'local_text'
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'First version.',
      '1.1.0': 'Files with the same bytes stored once (in one split); config names hold a manifest digest.',
  }

  # tfds finds a builder's file through `importlib_resources`, which is not
  # installed with tensorflow-datasets; this file is the answer anyway.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'path': tfds.features.Text(),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    cfg = self.builder_config
    files = _checked_files(cfg)
    if manifest_digest(cfg.root, files) != cfg.manifest:
      raise RuntimeError(f'the files under {cfg.root} changed while {cfg.name} was being built; run again')
    kept, dropped = unique_contents(cfg.root, files)
    if len(kept) < 2:
      raise ValueError(f'config.dataset.path={cfg.root!r}: its {len(files)} files hold {len(kept)} distinct '
                       'content; the corpus needs at least 2 (train and validation are split by file).')
    if dropped:
      logging.info('%s: %d of %d files have the same bytes as another file; each content is stored once '
                   '(dropped, e.g.: %s)', cfg.name, len(dropped), len(files), ', '.join(dropped[:5]))
    not_text = [rel for rel in kept if mostly_not_text((pathlib.Path(cfg.root) / rel).read_bytes())]
    if not_text:
      logging.warning('%s: %d of %d documents are mostly not UTF-8 text (binary files?), e.g. %s; they are '
                      'trained on as the bytes they are (narrow config.dataset.patterns to leave them out)',
                      cfg.root, len(not_text), len(kept), ', '.join(not_text[:5]))
    self.info.metadata.update(files=len(files), duplicate_files_dropped=len(dropped), not_text_files=len(not_text))
    splits = assign_splits(kept, cfg.validation_fraction)
    return {name: self._generate_examples(paths) for name, paths in splits.items()}

  def _generate_examples(self, relpaths):
    root = pathlib.Path(self.builder_config.root)
    for rel in relpaths:
      # Raw bytes: the stored text is exactly the file, whatever its encoding.
      yield rel, {'text': (root / rel).read_bytes(), 'path': rel}

  # tfds prints "Downloading and preparing dataset Unknown size ..." to stdout: nothing is downloaded here.
  def _log_download_bytes(self) -> None:
    logging.info('building %s/%s from the files under %s (once; later runs read the build)',
                 self.name, self.builder_config.name, self.builder_config.root)

  def _log_download_done(self) -> None:
    splits = ', '.join(f'{name} {split.num_examples}' for name, split in self.info.splits.items())
    logging.info('built %s (documents: %s)', self.data_dir, splits)


class PythonStdlib(LocalText, skip_registration=True):
  """The `.py` files of the running Python's standard library."""

  name = 'python_stdlib'


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  """An exclusive inter-process lock (fcntl); no lock where fcntl is missing."""
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
  except ImportError:  # Windows: no inter-process lock.
    yield
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'a+') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class _DropCustomConfigWarning(logging.Filter):
  """tfds warns "Using custom data configuration" for every config built at run time."""

  def filter(self, record):
    return not str(record.msg).startswith('Using custom data configuration')


def same_files(build: str, other: str) -> bool:
  """Whether two build names are snapshots of the same files (root, patterns, validation fraction)."""
  head, _, tail = build.rsplit('_', 2)
  other_head, _, other_tail = other.rsplit('_', 2)
  return (head, tail) == (other_head, other_tail)


def builder_for(name: str, *, data_dir: str = '', path: str = '',
                patterns=DEFAULT_PATTERNS,
                validation_fraction=DEFAULT_VALIDATION_FRACTION, build: str = '') -> LocalText:
  """The (not necessarily prepared) builder for 'python_stdlib' or 'local_text': of the files as they are now,
  or the earlier snapshot `build` of the same files, which must still be prepared under data_dir."""
  if name == 'python_stdlib':
    cls, config = PythonStdlib, stdlib_config(validation_fraction)
  elif name == 'local_text':
    cls, config = LocalText, directory_config(path, patterns, validation_fraction)
  else:
    raise ValueError(f'{name!r} is not a local corpus (python_stdlib, local_text).')
  if not build or build == config.name:
    return _construct(cls, config, data_dir)
  current = config.name
  builder = _construct(cls, dataclasses.replace(config, name=build, manifest=build.rsplit('_', 2)[1]), data_dir)
  if not builder.is_prepared():
    raise ValueError(
        f'the build {build} of {config.root} that the run trained on is no longer under {builder.data_dir_root}, '
        f'and the files changed since (now {current}): a split of the current files may hold documents the run '
        'trained on. Put that build back, or evaluate on data it never saw (--config with another '
        'config.dataset, and --other_dataset).')
  return builder


def _construct(cls, config: LocalTextConfig, data_dir) -> LocalText:
  quiet = _DropCustomConfigWarning()
  absl_logger = logging.getLogger('absl')
  absl_logger.addFilter(quiet)
  try:
    return cls(config=config, data_dir=data_dir or None, file_format='array_record')
  finally:
    absl_logger.removeFilter(quiet)


def _checked_files(config: LocalTextConfig) -> list[str]:
  """The files of `config`; fails, naming the config fields, when there are fewer than 2."""
  if not pathlib.Path(config.root).is_dir():
    raise ValueError(f'config.dataset.path={config.root!r} is not a directory.')
  files = list_files(config.root, config.patterns, config.exclude_dirs)
  if len(files) < 2:
    raise ValueError(
        f'config.dataset.path={config.root!r} has {len(files)} non-empty files '
        f'matching config.dataset.patterns={list(config.patterns)}; the corpus '
        'needs at least 2 (train and validation are split by file).')
  return files


def prepare(builder: LocalText) -> LocalText:
  """Builds the dataset if needed (once across processes) and returns a builder that reads it."""
  if builder.is_prepared():
    return builder
  config = builder.builder_config
  _checked_files(config)  # Fail before taking the lock.
  builds = pathlib.Path(builder.data_path).parent.parent
  lock = builds / f'.{config.name}.lock'
  with _file_lock(lock):
    # Another process may have finished while we waited: look again with a
    # fresh builder, which reads the dataset info from disk.
    builder = _construct(type(builder), config, os.fspath(builder.data_dir_root))
    if not builder.is_prepared():
      same_files = config.name.replace(config.manifest, '*')
      if earlier := sorted(p.name for p in builds.glob(same_files) if p.name != config.name):
        logging.warning('the files under %s changed since the build %s (added, removed or edited); building a '
                        'new snapshot %s (delete the old one under %s to free its space)',
                        config.root, ', '.join(earlier), config.name, builds)
      tfds.disable_progress_bar()  # its carriage returns garble saved logs; the build logs its own lines
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
