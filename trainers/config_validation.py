"""Checks an experiment config before anything is compiled.

Every error names the config field at fault (e.g. `config.model.num_heads`,
`config.mesh`, `config.batch_size`), so a wrong config costs seconds, not a
compile. `unknown_field` names an override of a field the config does not
have (the binaries' flag parser reports it in one line).
"""
import math

import jax
import numpy as np
from ml_collections import ConfigDict

import architectures
from layers import sharding
from trainers import data, partitioning
from trainers import tokenizer as tokenizer_lib

_FLOAT32_MAX = float(np.finfo(np.float32).max)
REQUIRED_FIELDS = ('model', 'dataset', 'seq_len', 'batch_size', 'total_steps', 'seed', 'optimizer',
                   'mesh', 'sharding_rules', 'checkpoint_every', 'log_every', 'eval_every')


def _positive(config: ConfigDict, field: str) -> None:
  if config[field] <= 0:
    raise ValueError(f'config.{field}={config[field]!r}: must be positive')


def _in_range(config: ConfigDict, field: str, low: float, high: float, *, low_open: bool = False,
              high_open: bool = False) -> None:
  """Refuses config.<field> (dotted) outside [low, high] (an open end excluded), NaN, or beyond float32's range."""
  value = config
  for key in field.split('.'):
    value = value[key]
  if abs(value) > _FLOAT32_MAX:
    raise ValueError(f'config.{field}={value!r}: beyond float32 (at most {_FLOAT32_MAX:.3g})')
  if not ((value > low if low_open else value >= low) and (value < high if high_open else value <= high)):  # NaN too
    interval = f'{"(" if low_open else "["}{low:g}, {high:g}{")" if high_open or high == math.inf else "]"}'
    raise ValueError(f'config.{field}={value!r}: must be a number in {interval}')


def _optimizer(config: ConfigDict) -> None:
  """Optimizer values no run can use: a learning rate that is not positive, NaN or beyond float32, a negative
  weight decay, AdamW betas outside [0, 1), eps <= 0, a negative clipping norm or warmup (warmup > steps is fine)."""
  _in_range(config, 'optimizer.learning_rate', 0, math.inf, low_open=True)
  _in_range(config, 'optimizer.weight_decay', 0, math.inf)
  _in_range(config, 'optimizer.b1', 0, 1, high_open=True)
  _in_range(config, 'optimizer.b2', 0, 1, high_open=True)
  _in_range(config, 'optimizer.eps', 0, math.inf, low_open=True)
  _in_range(config, 'optimizer.clip_norm', 0, math.inf)  # 0: no clipping
  _in_range(config, 'optimizer.end_lr_fraction', 0, 1)
  _in_range(config, 'optimizer.warmup_steps', 0, math.inf)


def _tokenizer(config: ConfigDict, vocab_size: int) -> None:
  """Refuses a config.tokenizer that does not load (tokenizer.load names why), one whose vocabulary
  config.model.vocab_size does not cover, and a subword tokenizer for the synthetic tasks (written in bytes)."""
  tokenizer = tokenizer_lib.from_config(config)
  if vocab_size < tokenizer.vocab_size:
    raise ValueError(f'config.model.vocab_size={vocab_size}: {tokenizer.description} needs at least '
                     f'{tokenizer.vocab_size}')
  if tokenizer.identity != tokenizer_lib.BYTES and config.dataset.name in data.synthetic.TASKS:
    raise ValueError(f'config.tokenizer={config.tokenizer!r}: the synthetic task config.dataset.name='
                     f"{config.dataset.name!r} is written in byte tokens; use config.tokenizer='bytes'")


def unknown_field(config: ConfigDict, dotted: str) -> str | None:
  """'unknown field config.<dotted>; known: ...' if `config` has no such (nested) field, else None."""
  node, parts = config, dotted.split('.')
  for i, key in enumerate(parts):
    path = '.'.join(['config', *parts[:i + 1]])
    if not isinstance(node, ConfigDict):
      return f'{path.rsplit(".", 1)[0]} is a value, not a group of fields: config.{dotted} does not exist'
    if key not in node:
      return f'unknown field {path}; known: {", ".join(sorted(node.keys()))}'
    node = node[key]
  return None


def validate(config: ConfigDict, num_devices: int | None = None) -> architectures.base.ModelConfig:
  """Raises ValueError naming the field; returns the family's model config."""
  missing = [f for f in REQUIRED_FIELDS if f not in config]
  if missing:
    raise ValueError(f'config is missing fields {missing}')
  model_config = architectures.model_config(config.model.to_dict())
  forecasting = config.dataset.name in data.timeseries.DATASETS
  features = config.dataset.get('features', 1)
  if forecasting and model_config.input_features != features:
    raise ValueError(f'config.model.input_features={model_config.input_features}: the time series '
                     f'{config.dataset.name!r} has config.dataset.features={features}; set them equal')
  if not forecasting and model_config.input_features:
    raise ValueError(f'config.model.input_features={model_config.input_features}: continuous inputs need a '
                     f'time-series dataset ({data.timeseries.DATASETS}), not {config.dataset.name!r}')
  if model_config.input_features < 0:
    raise ValueError(f'config.model.input_features={model_config.input_features}: must be >= 0')
  if not forecasting:
    _tokenizer(config, model_config.vocab_size)
  for field in ('seq_len', 'batch_size', 'total_steps', 'checkpoint_every', 'log_every', 'eval_every'):
    _positive(config, field)
  for field in ('keep_checkpoints', 'eval_batches'):
    if config.get(field) is not None:
      _positive(config, field)
  _optimizer(config)
  if config.get('on_nonfinite', 'stop') not in ('stop', 'skip'):
    raise ValueError(f"config.on_nonfinite={config.on_nonfinite!r}: must be 'stop' or 'skip'")
  if config.get('prefill_chunk', 0) < 0:
    raise ValueError(f'config.prefill_chunk={config.prefill_chunk}: must be >= 0 (0 = the whole prompt in one call)')
  num_devices = jax.device_count() if num_devices is None else num_devices
  shape = partitioning.mesh_shape(config.mesh, num_devices)

  rules = partitioning.rules_table(config.sharding_rules)
  ruled = dict(rules)
  if missing := [a for a in sharding.PARAM_AXES + sharding.ACTIVATION_AXES if a not in ruled]:
    raise ValueError(f'config.sharding_rules has no rule for logical axes {missing}')
  for name, axes in rules:
    for axis in (() if axes is None else (axes,) if isinstance(axes, str) else axes):
      if axis not in shape:
        raise ValueError(f'config.sharding_rules maps {name!r} to mesh axis {axis!r}, '
                         f'which config.mesh does not have ({sorted(shape)})')

  batch_axes = ruled[sharding.ACT_BATCH]
  batch_axes = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else batch_axes
  split = 1
  for axis in batch_axes:
    split *= shape[axis]
  micro = config.get('grad_accum_steps', 1)
  if micro <= 0 or config.batch_size % micro:
    raise ValueError(f'config.grad_accum_steps={micro} must be positive and divide '
                     f'config.batch_size={config.batch_size}')
  if (config.batch_size // micro) % split:
    raise ValueError(f'config.batch_size={config.batch_size} (per micro-batch {config.batch_size // micro}) is not '
                     f'divisible by the {split} devices of the batch mesh axes {batch_axes}')
  if config.get('streaming') and config.streaming.enabled:
    if micro != 1:
      raise ValueError(f'config.grad_accum_steps={micro}: long-document streaming (config.streaming.enabled) '
                       'carries one cache per batch row and needs grad_accum_steps=1')
    if config.streaming.memory < 0:
      raise ValueError(f'config.streaming.memory={config.streaming.memory}: must be >= 0 (0 = config.seq_len)')
  return model_config
