"""Transformer baseline (global causal attention).

  --config=experiments/configs/transformer.py:tiny   CPU, trains in about a minute
  --config=experiments/configs/transformer.py:small  D=512, 8 layers, 8 heads (26.1M): experiments.compare's GPU
                                                     size, a few minutes a run
  --config=experiments/configs/transformer.py:150m   D=1024, 12 layers, 16 heads (153M parameters)
  --config=experiments/configs/transformer.py:400m   D=1024, 24 layers, vocabulary 32768 (the PyTorch peer's 375M shape)
  --config=experiments/configs/transformer.py:1b     D=2048, 16 layers, vocabulary 32768 (0.96B; multi-GPU scaling)
"""
from ml_collections import ConfigDict

from experiments.configs.common import base_config, model_config

SIZES = {
    'tiny': dict(num_layers=2, dim=128, num_heads=4, num_kv_heads=2, mlp_dim=384),
    # Every family's `small` is within 10% of this one's parameters (tests/test_compare.py).
    'small': dict(num_layers=8, dim=512, num_heads=8, num_kv_heads=8, mlp_dim=1408),
    '150m': dict(num_layers=12, dim=1024, num_heads=16, num_kv_heads=16, mlp_dim=2816),
    '400m': dict(num_layers=24, dim=1024, num_heads=16, num_kv_heads=16, mlp_dim=2816, vocab_size=32768),
    '1b': dict(num_layers=16, dim=2048, num_heads=16, num_kv_heads=16, mlp_dim=5632, vocab_size=32768),
}


def training_fields(config: ConfigDict, size: str) -> None:
  """Run length, batch and optimizer for a size: tiny runs on a CPU, the rest on accelerators. Every family's
  config calls it, so the optimizer settings of a size are the same for all families."""
  if size == 'tiny':
    config.update(seq_len=128, batch_size=16, total_steps=200, log_every=20, eval_every=100,
                  checkpoint_every=100, eval_batches=8)
    config.optimizer.update(learning_rate=3e-3, warmup_steps=20)
  elif size == 'small':  # experiments.compare on one GPU (its --tokens sets total_steps)
    config.update(seq_len=2048, batch_size=32, total_steps=1000, log_every=50, eval_every=500,
                  checkpoint_every=500, eval_batches=16, eval_extrapolation=(2, 4, 8), eval_tasks=('mqar', 'passkey'))
    config.optimizer.update(learning_rate=1e-3, warmup_steps=100)
  else:
    config.update(seq_len=2048, batch_size=32, total_steps=20_000, log_every=100, eval_every=1000,
                  checkpoint_every=1000)
    config.optimizer.update(learning_rate=6e-4, warmup_steps=1000)


def get_config(size: str = 'tiny') -> ConfigDict:
  if size not in SIZES:
    raise ValueError(f'unknown size {size!r}; known: {sorted(SIZES)}')
  config = base_config()
  config.model = model_config('transformer', **{'vocab_size': 384, **SIZES[size]})
  training_fields(config, size)
  return config
