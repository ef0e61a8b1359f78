"""Transformer-XL baseline of the Block-Recurrent Transformer paper: the Transformer family with a
sliding window of W keys, in long-document streaming mode, so each segment continues from the
last W keys of the previous one (the XL cache, carried without gradient).

  --config=experiments/configs/transformer_xl.py:tiny   window 8 (as block_recurrent.py:tiny), segments of 128
  --config=experiments/configs/transformer_xl.py:small  block_recurrent.py:small without the cell: window 512,
                                                        segments of 2048 (every family's rows at small)
  --config=experiments/configs/transformer_xl.py:150m   the paper's XL:512: window 512 and segments of 512
                                                        (no gradient across windows), 128 rows a step

Same shapes as block_recurrent.py without the recurrent cell. At tiny size the segment is longer
than the window so that evaluation (packed rows, no carried cache) sees context.
"""
from ml_collections import ConfigDict

from experiments.configs import block_recurrent
from experiments.configs.common import base_config, model_config
from experiments.configs.transformer import training_fields

FIELDS = ('num_layers', 'dim', 'num_heads', 'num_kv_heads', 'mlp_dim', 'window')


def get_config(size: str = 'tiny', num_layers: int | None = None) -> ConfigDict:
  if size not in block_recurrent.SIZES:
    raise ValueError(f'unknown size {size!r}; known: {sorted(block_recurrent.SIZES)}')
  fields = {k: v for k, v in block_recurrent.SIZES[size].items() if k in FIELDS}
  if num_layers is not None:
    fields['num_layers'] = num_layers
  config = base_config()
  config.model = model_config('transformer', vocab_size=384, **fields)
  training_fields(config, size)
  if size not in ('tiny', 'small'):
    config.update(seq_len=fields['window'], batch_size=128)  # 64K tokens a step
  config.streaming.enabled = True
  config.streaming.memory = fields['window']  # the XL cache: the last W keys of each layer
  return config
