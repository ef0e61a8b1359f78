"""Sliding-window attention: the Transformer baseline with every layer attending
to the last `window` keys (itself included), decoded with a ring buffer.

  --config=experiments/configs/sliding.py:tiny   window 32 at seq_len 128
  --config=experiments/configs/sliding.py:small  window 512 at seq_len 2048 (a quarter of the row, as at 150m)
  --config=experiments/configs/sliding.py:150m   window 1024 at seq_len 4096
"""
from ml_collections import ConfigDict

from experiments.configs import transformer


def get_config(size: str = 'tiny') -> ConfigDict:
  config = transformer.get_config(size)
  if size == 'tiny':
    config.model.window = 32
  elif size == 'small':  # the rows of every family at small (transformer.training_fields)
    config.model.window = 512
  else:
    config.model.window = 1024
    config.update(seq_len=4096, batch_size=16)
  return config
