"""A fake gs:// for tests, without network: gs://<bucket>/<path> is stored under <root>/<bucket>/<path>.

etils.epath goes through `epath.testing.mock_epath` (every path function maps gs:// to the local folder and
back), and orbax's two calls that would reach Google Cloud Storage are patched: tensorstore's kvstore spec
(a `file` driver on the same folder instead of the `gcs` one) and the hierarchical-namespace query. Everything
else is what runs on a real bucket: orbax picks its GCS code paths (commit files instead of renames) by the
gs:// prefix, and this project's code sees gs:// paths only.
"""
import contextlib
import os
from collections.abc import Iterator
from unittest import mock

from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils


@contextlib.contextmanager
def fake_gcs(root: str | os.PathLike) -> Iterator[None]:
  root = os.fspath(root)

  def local(path) -> str:
    path = os.fspath(path)
    return os.path.join(root, path[len('gs://'):]) if path.startswith('gs://') else path

  def remote(path: str) -> str:
    return 'gs://' + os.path.relpath(path, root) if path.startswith(root + os.sep) else path

  def one(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def two(original, path, destination, *args, **kwargs):
    return original(local(path), local(destination), *args, **kwargs)

  def glob(original, pattern):
    return [remote(p) for p in original(local(pattern))]

  def walk(original, top, **kwargs):
    for folder, dirs, files in original(local(top), **kwargs):
      yield remote(folder), dirs, files

  with epath_testing.mock_epath(open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
                                rmtree=one, stat=one, rename=two, replace=two, copy=two, glob=glob, walk=walk), \
      mock.patch.object(gcs_utils, 'get_kvstore_for_gcs', lambda path: {'driver': 'file', 'path': local(path)}), \
      mock.patch.object(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False):
    yield
