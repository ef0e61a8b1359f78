"""Hybrid: a pattern of mixers (architectures/hybrid.py), here Samba's shape with Griffin's recurrence: RG-LRU
and sliding-window attention layers alternating, each followed by a SwiGLU MLP.

  --config=experiments/configs/hybrid.py:tiny    CPU: 'rg_lru,local_attention', D=128, window 16
  --config=experiments/configs/hybrid.py:small   '(rg_lru,local_attention)*4': D=512, 8 heads, window 1024 (25.1M)
  --config=experiments/configs/hybrid.py:150m    '(rg_lru,local_attention)*6': D=1024, 8 heads, window 1024 (149M)

Any other hybrid is a config line (the mixers' blocks keep their settings for this size):

  --config.model.layers='(rg_lru*2,local_attention)*3'                     Griffin's pattern
  --config.model.layers='gated_retention*4,cross_attention*4'              YOCO's
  --config.model.layers='wkv6*5,gold*3' --config.model.mlp=channel_mix     GoldFinch's mixers
  --config.model.layers='rg_lru*3,attention,rg_lru*3,attention'            Jamba-like (global attention 1 in 4)
  --config.model.local_attention.window=512 --config.model.rg_lru.width=768
"""
from ml_collections import ConfigDict

from experiments.configs.common import base_config, model_config
from experiments.configs.transformer import training_fields

SIZES = {
    'tiny': dict(layers='rg_lru,local_attention', dim=128, mlp_dim=384, heads=4, window=16, head_dim=32),
    # Within 10% of the Transformer small's parameters (26.1M), as every family's small (experiments.compare).
    'small': dict(layers='(rg_lru,local_attention)*4', dim=512, mlp_dim=1536, heads=8, window=1024, head_dim=64),
    # Griffin's 150m shape (D=1024, 12 layers, MLP 3 D) with the layers alternating.
    '150m': dict(layers='(rg_lru,local_attention)*6', dim=1024, mlp_dim=3072, heads=8, window=1024, head_dim=64),
}


def get_config(size: str = 'tiny') -> ConfigDict:
  if size not in SIZES:
    raise ValueError(f'unknown size {size!r}; known: {sorted(SIZES)}')
  s = SIZES[size]
  heads = dict(num_heads=s['heads'])
  config = base_config()
  config.model = model_config(
      'hybrid', vocab_size=384, layers=s['layers'], dim=s['dim'], mlp_dim=s['mlp_dim'], attention=heads,
      local_attention=dict(heads, window=s['window']), rg_lru=heads, gated_retention=heads, aaren=heads,
      block_recurrent=heads, cross_attention=heads, wkv6=dict(head_dim=s['head_dim']),
      gold=dict(head_dim=s['head_dim']))
  config.model.num_layers = 0  # the pattern's length, whatever pattern the command line gives
  training_fields(config, size)
  return config
