"""Griffin: RG-LRU recurrent blocks and local MQA attention, pattern (recurrent, recurrent, attention).

  --config=experiments/configs/griffin.py:tiny                CPU, trains in about a minute
  --config=experiments/configs/griffin.py:small               D=512, 9 layers (3 x rra), 8 heads, window
                                                              1024 (the paper's at 2048-token rows); 28.4M
  --config=experiments/configs/griffin.py:150m                D=1024, 12 layers, 8 heads, window 1024 (151M)
  --config=experiments/configs/griffin.py:bench               recurrentgemma's benchmark shape: 150m with vocabulary 32768
                                                              and its window 1024 (1025 here); 184M
  --config=experiments/configs/griffin.py:1b                  D=2048, 18 layers, 16 heads, vocabulary 32768 (0.96B;
                                                              multi-GPU scaling)
  --config=experiments/configs/griffin.py:recurrentgemma_2b   RecurrentGemma-2B's shape (2.68B parameters)
  --config=experiments/configs/griffin.py:recurrentgemma_9b   RecurrentGemma-9B's shape (8.58B)
  --config=experiments/configs/griffin.py:griffin_paper_7b    the paper's Griffin 7B (7.80B with a 256k vocabulary; no embedding
                                                              scale, no soft cap)

`window` counts the keys a query sees, itself included: recurrentgemma's
attention_window_size w is window w + 1 here (2048 -> 2049), so the published
shapes match the released models exactly. Their vocabulary is Gemma's 256000 (a
SentencePiece model released with the weights, not shipped here; the configs here train on bytes unless
config.tokenizer names a model file, trainers/tokenizer.py); load weights with
architectures/griffin_convert.py (docs/architectures.md, Griffin), or sample them with their tokenizer:
experiments/sample_recurrentgemma.py.
"""
from ml_collections import ConfigDict

from experiments.configs.common import base_config, model_config
from experiments.configs.transformer import training_fields

GEMMA_VOCAB = 256_000

SIZES = {
    'tiny': dict(vocab_size=384, num_layers=3, dim=128, num_heads=4, lru_width=128, mlp_dim=384, window=16),
    'small': dict(vocab_size=384, num_layers=9, dim=512, num_heads=8, lru_width=512, mlp_dim=1536, window=1024),
    '150m': dict(vocab_size=384, num_layers=12, dim=1024, num_heads=8, lru_width=1024, mlp_dim=3072, window=1024),
    'bench': dict(vocab_size=32768, num_layers=12, dim=1024, num_heads=8, lru_width=1024, mlp_dim=3072, window=1025),
    '1b': dict(vocab_size=32768, num_layers=18, dim=2048, num_heads=16, lru_width=2048, mlp_dim=6144, window=1025),
    'recurrentgemma_2b': dict(vocab_size=GEMMA_VOCAB, num_layers=26, dim=2560, num_heads=10, lru_width=2560,
                              mlp_dim=3 * 2560, window=2048 + 1),
    'recurrentgemma_9b': dict(vocab_size=GEMMA_VOCAB, num_layers=38, dim=4096, num_heads=16, lru_width=4096,
                              mlp_dim=3 * 4096, window=2048 + 1),
    'griffin_paper_7b': dict(vocab_size=GEMMA_VOCAB, num_layers=32, dim=4096, num_heads=32, lru_width=5632,
                             mlp_dim=3 * 4096, window=1024 + 1, scale_embeddings=False, logits_soft_cap=0.0),
}


def get_config(size: str = 'tiny', block_pattern: str = 'rra', sizes: dict = SIZES) -> ConfigDict:
  if size not in sizes:
    raise ValueError(f'unknown size {size!r}; known: {sorted(sizes)}')
  config = base_config()
  config.model = model_config('griffin', block_pattern=block_pattern, **sizes[size])
  training_fields(config, size)
  return config
