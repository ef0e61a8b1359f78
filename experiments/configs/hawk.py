"""Hawk: Griffin with only recurrent (RG-LRU) blocks, no attention (block_pattern 'r').

  --config=experiments/configs/hawk.py:tiny            CPU, trains in about a minute (2 layers)
  --config=experiments/configs/hawk.py:small           griffin.py:small with 8 recurrent layers
  --config=experiments/configs/hawk.py:150m            D=1024, 12 layers, lru 1024 (155M)
  --config=experiments/configs/hawk.py:hawk_paper_7b   the paper's Hawk 7B (8.16B with a 256k vocabulary; no embedding scale,
                                                     no soft cap)
"""
from ml_collections import ConfigDict

from experiments.configs import griffin

SIZES = {
    'tiny': dict(griffin.SIZES['tiny'], num_layers=2),  # the Transformer's tiny depth (and size: 0.46M)
    'small': dict(griffin.SIZES['small'], num_layers=8),  # 9 would be 12% over the Transformer small
    '150m': griffin.SIZES['150m'],
    'hawk_paper_7b': griffin.SIZES['griffin_paper_7b'],
}


def get_config(size: str = 'tiny') -> ConfigDict:
  return griffin.get_config(size, block_pattern='r', sizes=SIZES)
