"""Workdir paths: every file of a workdir goes through etils.epath (what orbax uses), so a
`--workdir=gs://bucket/run` (or any filesystem epath registers) works like a local folder.

`as_path` keeps a URI as it is (os.path.abspath would turn gs://b/run into a local folder named `gs:`)
and makes a local path absolute (orbax needs that). Object stores have no append and no atomic rename:
`write_text_atomically` (and `write_bytes_atomically`) replace a file whole (a temporary file renamed over it,
atomic on a local disk).
"""
import os

from etils import epath


def is_local(path: str | os.PathLike) -> bool:
  return '://' not in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: a URI (gs://, s3://, ...) kept as it is, a local path made absolute."""
  if is_local(path):
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
  return epath.Path(path)


def write_text_atomically(path: epath.Path, text: str) -> None:
  """Writes `text` (UTF-8) to a temporary file beside `path`, then renames it over `path`."""
  write_bytes_atomically(path, text.encode('utf-8'))


def write_bytes_atomically(path: epath.Path, data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, then renames it over `path`."""
  temporary = path.with_name(path.name + '.tmp')
  temporary.write_bytes(data)
  temporary.replace(path)
