"""Experiment configs: one file per family preset, `get_config(size)` in each (common.py: shared fields)."""
import importlib
import os

from ml_collections import ConfigDict

_DIR = os.path.dirname(os.path.abspath(__file__))
NAMES = sorted(name[:-3] for name in os.listdir(_DIR) if name.endswith('.py') and not name.startswith(('_', 'common')))


def get(name: str, size: str) -> ConfigDict:
  """experiments/configs/<name>.py:<size>."""
  if name not in NAMES:
    raise ValueError(f'unknown config {name!r}; known: {NAMES}')
  return importlib.import_module(f'experiments.configs.{name}').get_config(size)
