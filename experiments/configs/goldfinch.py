"""GoldFinch: Finch-C2 (RWKV-6) layers, then GOLD attention layers over one compressed
key cache (docs/architectures.md, GoldFinch; architectures/goldfinch.py).

  --config=experiments/configs/goldfinch.py:tiny       CPU, trains in about a minute
  --config=experiments/configs/goldfinch.py:small      8 layers (5 Finch-C2 + 3 GOLD, the paper's split rule), D=512
  --config=experiments/configs/goldfinch.py:l12_d768   the paper's ablation shape: 12 layers (8 Finch-C2
                                                       + 4 GOLD), D=768, head size 64

GOLD with RoPE (the paper's ablation): --config.model.gold_rope=True.
"""
from ml_collections import ConfigDict

from experiments.configs.common import base_config, model_config
from experiments.configs.transformer import training_fields

SIZES = {
    # 3 layers: 2 Finch-C2 + 1 GOLD; 4 heads of 32; keys compressed 128 -> 8; wkv chunks of 32
    # (rows of 128 train in 4 chunks; the contract test's rows of 40 in a full and a partial one).
    'tiny': dict(num_layers=3, dim=128, head_dim=32, mix_lora_rank=16, decay_lora_rank=16, gold_lora_rank=16,
                 wkv_chunk_size=32),
    'small': dict(num_layers=8, dim=512, head_dim=64, wkv_chunk_size=64),
    'l12_d768': dict(num_layers=12, dim=768, head_dim=64, wkv_chunk_size=64),
}


def get_config(size: str = 'tiny', **fields) -> ConfigDict:
  if size not in SIZES:
    raise ValueError(f'unknown size {size!r}; known: {sorted(SIZES)}')
  config = base_config()
  config.model = model_config('goldfinch', vocab_size=384, **{**SIZES[size], **fields})
  training_fields(config, size)
  return config
