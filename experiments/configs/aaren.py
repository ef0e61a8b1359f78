"""Aaren: the Transformer with attention replaced by a learned-query prefix-scan attention.

  --config=experiments/configs/aaren.py:tiny   CPU
  --config=experiments/configs/aaren.py:small  the Transformer small's shape (no query projection: 8% fewer parameters)
  --config=experiments/configs/aaren.py:150m   D=1024, 12 layers, 16 heads
"""
from ml_collections import ConfigDict

from experiments.configs import transformer
from experiments.configs.common import base_config, model_config


def get_config(size: str = 'tiny') -> ConfigDict:
  if size not in transformer.SIZES:
    raise ValueError(f'unknown size {size!r}; known: {sorted(transformer.SIZES)}')
  config = base_config()
  fields = dict(transformer.SIZES[size], num_kv_heads=0)
  config.model = model_config('aaren', **{'vocab_size': 384, 'chunk_size': 16 if size == 'tiny' else 128, **fields})
  transformer.training_fields(config, size)
  return config
