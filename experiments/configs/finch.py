"""Finch (RWKV-6): every layer RWKV-6 time-mix + channel-mix, no GOLD layers; the paper's
baseline for GoldFinch, built by the same model (architectures/goldfinch.py, gold_layers=0).

  --config=experiments/configs/finch.py:tiny       CPU, trains in about a minute
  --config=experiments/configs/finch.py:small      goldfinch.py:small with 7 RWKV-6 layers (GOLD layers are cheaper:
                                                   8 RWKV-6 layers would be 13% over the Transformer small)
  --config=experiments/configs/finch.py:l12_d768   the paper's ablation shape: 12 layers, D=768

Finch-C2 everywhere (the paper's ablation): --config.model.time_mix=finch_c2.
"""
from ml_collections import ConfigDict

from experiments.configs import goldfinch


NUM_LAYERS = {'small': 7}  # sizes where Finch's depth differs from GoldFinch's


def get_config(size: str = 'tiny') -> ConfigDict:
  depth = {'num_layers': NUM_LAYERS[size]} if size in NUM_LAYERS else {}
  return goldfinch.get_config(size, time_mix='finch', gold_layers=0, **depth)
