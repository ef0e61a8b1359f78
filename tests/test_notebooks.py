"""Every notebook runs top to bottom on CPU (a cell that raises fails the test),
and is committed without outputs."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, 'notebooks', '*.ipynb')))


@pytest.mark.slow  # a kernel per notebook; quickstart.ipynb trains a model
@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_and_is_stripped(path, data_dir, monkeypatch):
  notebook = nbformat.read(path, as_version=4)
  assert all(not cell.get('outputs') and not cell.get('execution_count')
             for cell in notebook.cells if cell.cell_type == 'code'), 'commit notebooks without outputs'
  monkeypatch.setenv('TFDS_DATA_DIR', str(data_dir))
  monkeypatch.setenv('QUICKSTART_STEPS', '60')  # the user's default is 300; the code path is the same
  monkeypatch.setenv('PYTHONPATH', REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  NotebookClient(notebook, timeout=900, kernel_name='python3', resources={'metadata': {'path': REPO}}).execute()
