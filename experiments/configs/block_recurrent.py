"""Block-Recurrent Transformer (Hutchins et al. 2022), trained in long-document streaming mode:
row j of every batch continues its own document, and the model cache (the last window's keys in
every layer, the recurrent state) is carried from step to step.

  --config=experiments/configs/block_recurrent.py:tiny   CPU: window 8, 8 states, 3 layers (the middle
                                                         one recurrent), segments of 128
  --config=experiments/configs/block_recurrent.py:small  D=512, 8 layers (layer 5, the third from the top,
                                                         recurrent), W=512, S=512, rows of 2048 as every
                                                         family at small (experiments.compare)
  --config=experiments/configs/block_recurrent.py:150m   the paper's medium model, Rec:fixed:skip:
                                                         D=1024, 12 layers (layer 9 recurrent), W=512,
                                                         S=512, segments of 4096 tokens

The cell's options are fields: --config.model.gate=lstm, --config.model.variant=dual|single,
--config.model.recurrent_layers='(4, 9)'; meliad's attention with --config.model.position=t5
--config.model.qk_norm=True. Baselines: transformer_xl.py (the same windowed attention, no
recurrence) and sliding_13l.py (one more layer instead of the recurrence).
"""
from ml_collections import ConfigDict

from experiments.configs.common import base_config, model_config
from experiments.configs.transformer import training_fields

SIZES = {
    'tiny': dict(num_layers=3, dim=128, num_heads=4, num_kv_heads=2, mlp_dim=384, window=8, num_states=8,
                 recurrent_layers=(1,)),
    # The Transformer small's width and heads (8, as 150m); SwiGLU 1280 (2.5 D, not 150m's 2.75 D) so that
    # Slide:9 (sliding_13l.py, one layer more) stays within 10% of the Transformer small's parameters too.
    'small': dict(num_layers=8, dim=512, num_heads=8, num_kv_heads=8, mlp_dim=1280, window=512, num_states=512),
    # meliad's medium_150M: 8 heads of 128; the FFN is SwiGLU (2816 ~ its 4096-unit ReLU MLP in parameters).
    '150m': dict(num_layers=12, dim=1024, num_heads=8, num_kv_heads=8, mlp_dim=2816, window=512, num_states=512),
}


def get_config(size: str = 'tiny') -> ConfigDict:
  if size not in SIZES:
    raise ValueError(f'unknown size {size!r}; known: {sorted(SIZES)}')
  config = base_config()
  fields = {'recurrent_layers': (-3,), **SIZES[size]}  # meliad: the third layer from the top
  config.model = model_config('block_recurrent', vocab_size=384, gate='fixed', variant='skip', **fields)
  training_fields(config, size)
  if size not in ('tiny', 'small'):  # small: every family's rows and batch (transformer.training_fields)
    config.update(seq_len=4096, batch_size=16)  # 64K tokens a step, as the sliding and XL baselines
  config.streaming.enabled = True  # the cache is fixed-size: streaming.memory does not change it
  return config
