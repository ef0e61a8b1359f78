"""Test setup: 8 fake CPU devices, set before JAX starts (DESIGN.md, "Sharding")."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A tfds data_dir shared by the session; the embedded corpus is built into it once."""
  return tmp_path_factory.mktemp('tensorflow_datasets')
