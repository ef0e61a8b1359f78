"""Sliding-window baseline with 13 layers (the paper's Slide:13): the Transformer family with a
window of W keys, one layer more than block_recurrent.py in place of its recurrent cell (about
the same parameters and step time), trained on the same streamed segments with the XL cache
carried between them.

  --config=experiments/configs/sliding_13l.py:tiny   4 layers (block_recurrent tiny has 3), window 8
  --config=experiments/configs/sliding_13l.py:small  9 layers (block_recurrent small has 8), window 512,
                                                     segments of 2048 (every family's rows at small)
  --config=experiments/configs/sliding_13l.py:150m   13 layers, window 512, segments of 4096
"""
from ml_collections import ConfigDict

from experiments.configs import block_recurrent, transformer_xl


def get_config(size: str = 'tiny') -> ConfigDict:
  if size not in block_recurrent.SIZES:
    raise ValueError(f'unknown size {size!r}; known: {sorted(block_recurrent.SIZES)}')
  config = transformer_xl.get_config(size, num_layers=block_recurrent.SIZES[size]['num_layers'] + 1)
  if size not in ('tiny', 'small'):
    config.update(seq_len=4096, batch_size=16)  # segments as block_recurrent.py:150m
  return config
