"""The comparison command end to end in miniature: two families, a few steps."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow  # trains, evaluates and measures two families in a subprocess
def test_compare_writes_the_table_and_the_plots(data_dir, tmp_path):
  subprocess.run([sys.executable, '-m', 'experiments.compare', '--families=transformer,aaren', '--steps=3',
                  '--contexts=32,64', f'--workdir={tmp_path}', f'--data_dir={data_dir}'],
                 cwd=REPO, check=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  table = (tmp_path / 'compare.md').read_text()
  assert '| transformer |' in table and '| aaren |' in table
  results = json.loads((tmp_path / 'compare.json').read_text())
  by_name = {r['name']: r for r in results}
  assert by_name['aaren']['cache_bytes']['65536'] == by_name['aaren']['cache_bytes']['1024']  # constant state
  assert by_name['transformer']['cache_bytes']['65536'] == 64 * by_name['transformer']['cache_bytes']['1024'] - 63 * 8  # + cursor
  for name in ('loss', 'loss_by_context', 'cache', 'decode'):
    assert (tmp_path / f'compare_{name}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
