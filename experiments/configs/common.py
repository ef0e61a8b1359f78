"""Fields every experiment config shares (model, tokenizer, dataset, seq_len, batch_size, total_steps, seed,
optimizer, mesh, checkpoint_every, log_every, eval_every, ...), whatever the family.

A family's config file calls `base_config()` and fills `config.model`.
"""
import dataclasses
from collections.abc import Mapping

from ml_collections import ConfigDict

import architectures

# Logical axis -> mesh axes. Parameters: FSDP over `fsdp`, Megatron-style tensor
# parallelism over `tensor` (query heads, MLP and recurrence widths, vocab).
# K/V heads stay replicated over `tensor`: MQA has one. Activations: batch over data x fsdp.
DEFAULT_SHARDING_RULES = (
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', None),
    ('kv', None),
    ('mlp', 'tensor'),
    ('lru', 'tensor'),
    ('conv', None),
    ('vocab', 'tensor'),
    ('layers', None),
    ('norm', None),
    ('act_batch', ('data', 'fsdp')),
    ('act_length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', None),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
)


def model_config(name: str, **fields) -> ConfigDict:
  """`config.model` for family `name`: every field of its config dataclass, so each can be overridden."""
  family_config = architectures.get_family(name).Config(**fields)
  values = dataclasses.asdict(family_config)  # a hybrid's blocks (frozen) as dicts, so each key can be overridden
  return ConfigDict(dict(name=name, **{k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()}))


def base_config() -> ConfigDict:
  config = ConfigDict()
  config.model = ConfigDict()
  # 'bytes' (ids 0..255 and EOS 256), or the path of a SentencePiece model file (experiments.train_tokenizer;
  # config.model.vocab_size must cover its vocabulary); bits per byte compares the two (trainers/tokenizer.py).
  config.tokenizer = 'bytes'
  config.dataset = ConfigDict(dict(
      name='python_stdlib',          # embedded default; 'local_text' (+ path) or a tfds catalog name
      path='',
      patterns=('**/*.txt', '**/*.md', '**/*.py'),
      data_dir='',                   # '' = tfds default (~/tensorflow_datasets)
      validation_fraction=0.05,
      text_feature='text',
      num_threads=2,
      prefetch=4,
      # Synthetic tasks (name='mqar' | 'passkey' | 'selective_copy'; trainers/data/synthetic.py):
      num_pairs=8,                   # mqar: key-value pairs per row
      depth=-1.0,                    # passkey: where the key sits (0..1; -1 = random)
      num_tokens=8,                  # selective_copy: letters to copy
      features=1,                    # time series (name='mackey_glass'): channels; = model.input_features
  ))
  # Long-document streaming: row j of every batch continues its own document stream and the
  # model cache (memory tokens; 0 = seq_len) is carried from step to step (Transformer-XL).
  config.streaming = ConfigDict(dict(enabled=False, memory=0))
  config.seq_len = 256
  config.batch_size = 16
  config.grad_accum_steps = 1
  config.total_steps = 1000
  config.seed = 0
  config.optimizer = ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=100, end_lr_fraction=0.1,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = DEFAULT_SHARDING_RULES
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  config.log_every = 50
  config.eval_every = 500
  config.eval_batches = 16
  config.eval_extrapolation = (2, 4, 8)   # experiments.evaluate: rows k x seq_len long
  config.eval_tasks = ('mqar', 'passkey', 'selective_copy')  # experiments.evaluate: answer accuracy
  config.profile_steps = ()
  # Inference (experiments.sample, benchmark --mode=decode): prompt tokens per prefill call; 0 = the whole
  # prompt in one call (through the attention kernels of training), C > 0 = O(C x context) memory anywhere.
  config.prefill_chunk = 0
  config.on_nonfinite = 'stop'       # 'stop': halt naming the step and leaf; 'skip': drop the step's update
  return config
