"""Model families by name: `config.model.name` -> model class and its config."""
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from architectures.base import ConfigError, ModelConfig, SequenceModel

_FAMILIES: dict[str, type[SequenceModel]] = {}


def register(name: str) -> Callable[[type[SequenceModel]], type[SequenceModel]]:
  def add(cls: type[SequenceModel]) -> type[SequenceModel]:
    if name in _FAMILIES:
      raise ValueError(f'model family {name!r} registered twice')
    _FAMILIES[name] = cls
    return cls
  return add


def families() -> list[str]:
  return sorted(_FAMILIES)


def get_family(name: str) -> type[SequenceModel]:
  if name not in _FAMILIES:
    raise ConfigError(f'config.model.name={name!r}: unknown model family; known: {families()}')
  return _FAMILIES[name]


def model_config(model_fields: Mapping[str, Any]) -> ModelConfig:
  """Validated family config from `config.model` (a mapping with `name`)."""
  if 'name' not in model_fields:
    raise ConfigError(f'config.model.name is missing; known families: {families()}')
  return get_family(model_fields['name']).Config.from_mapping(model_fields)


def create_model(model_fields: Mapping[str, Any], rngs: nnx.Rngs) -> SequenceModel:
  return get_family(model_fields['name'])(model_config(model_fields), rngs=rngs)
