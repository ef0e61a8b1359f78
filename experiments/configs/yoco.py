"""YOCO (You Only Cache Once): a self-decoder with constant-size caches, then a
cross-decoder over one shared K/V cache (docs/architectures.md, YOCO).

  --config=experiments/configs/yoco.py:tiny   CPU, trains in about a minute
  --config=experiments/configs/yoco.py:small  8 layers (4 self + 4 cross), D=512
  --config=experiments/configs/yoco.py:160m   12 layers, D=768: the paper's ablation size
                                              (82M parameters with the byte vocabulary)

The self-decoder mixer is a field: gated retention by default, or
  --config.model.self_mixer=sliding_window   (YOCO_SWA; window `config.model.window`)
"""
from ml_collections import ConfigDict

from experiments.configs.common import base_config, model_config
from experiments.configs.transformer import training_fields

SIZES = {
    # 1 self + 1 cross layer; retention chunks of 32: rows of 128 train in 4 chunks (the family
    # contract test's rows of 40 in a full and a partial chunk).
    'tiny': dict(num_layers=2, dim=128, num_heads=4, num_kv_heads=2, mlp_dim=384, window=16,
                 retention_chunk_size=32),
    # 160m's ratios at the Transformer small's width: retention heads of 128, an MLP of about 8/3 D (1408, the
    # Transformer small's); 8 query heads over 2 K/V heads (160m's 3 to 1 does not divide 8 heads).
    'small': dict(num_layers=8, dim=512, num_heads=8, num_kv_heads=2, self_num_heads=4, mlp_dim=1408,
                  window=1024, retention_chunk_size=256),
    # The paper's 160M ablation shape (12 layers, D=768); heads and the 8/3 MLP ratio follow the
    # reference's 3B config scaled down (query heads 3x the K/V heads, retention head size 128).
    '160m': dict(num_layers=12, dim=768, num_heads=12, num_kv_heads=4, self_num_heads=6, mlp_dim=2048,
                 window=1024, retention_chunk_size=256),
}


def get_config(size: str = 'tiny') -> ConfigDict:
  if size not in SIZES:
    raise ValueError(f'unknown size {size!r}; known: {sorted(SIZES)}')
  config = base_config()
  config.model = model_config('yoco', vocab_size=384, **SIZES[size])
  training_fields(config, size)
  return config
