"""A wrong experiment config fails before anything compiles, naming the field."""
import dataclasses

import jax
import pytest

import architectures
from tests.helpers import family_tiny_config, tiny_experiment
from trainers.experiment import Experiment


@pytest.mark.parametrize('overrides,message', [
    ({'mesh': dict(data=2, fsdp=2, tensor=1)}, r'config\.mesh=.* needs 4 devices but 8 are available'),
    ({'mesh': dict(data=-1, fsdp=3, tensor=1)}, r'config\.mesh=.* do not divide the 8 devices'),
    ({'mesh': dict(data=-1, pipeline=2)}, r'config\.mesh has unknown axes \[\'pipeline\'\]'),
    ({'batch_size': 6, 'mesh': dict(data=4, fsdp=2, tensor=1)}, r'config\.batch_size=6 .* not divisible by the 8 devices'),
    ({'grad_accum_steps': 3}, r'config\.grad_accum_steps=3 must .* divide config\.batch_size=8'),
    ({'model.num_heads': 3}, r'config\.model\.num_heads=3: does not divide config\.model\.dim=32'),
    ({'model.name': 'mamba'}, r"config\.model\.name='mamba': unknown model family"),
    ({'model.vocab_size': 200}, r'config\.model\.vocab_size=200: the byte tokenizer needs at least 257'),
    ({'seq_len': 0}, r'config\.seq_len=0: must be positive'),
    ({'prefill_chunk': -1}, r'config\.prefill_chunk=-1: must be >= 0'),
    ({'optimizer.learning_rate': float('nan')}, r'config\.optimizer\.learning_rate=nan: must be a number in \(0, '),
    ({'optimizer.learning_rate': 0.0}, r'config\.optimizer\.learning_rate=0\.0: must be a number in \(0, inf\)'),
    ({'optimizer.learning_rate': 1e39}, r'config\.optimizer\.learning_rate=1e\+39: beyond float32'),
    ({'optimizer.weight_decay': -0.1}, r'config\.optimizer\.weight_decay=-0\.1: must be a number in \[0, inf\)'),
    ({'optimizer.b2': 1.0}, r'config\.optimizer\.b2=1\.0: must be a number in \[0, 1\)'),
    ({'keep_checkpoints': 0}, r'config\.keep_checkpoints=0: must be positive'),
    ({'sharding_rules': (('embed', 'fsdp'),)}, r'config\.sharding_rules has no rule for logical axes'),
    ({'mesh': dict(data=4, fsdp=1, tensor=2), 'model.vocab_size': 385},
     r"params\['io'\]\['embed'\]\['table'\].* dimension of 385 .* does not divide over mesh axes \('tensor',\)"),
])
@pytest.mark.fault('a wrong config: unknown family or field, heads not dividing the width, a mesh that does not match '
                   'the devices, a batch not dividing over the data axes, a parameter that does not divide over its '
                   'mesh axes, a non-positive length, a negative prefill chunk, a learning rate that is NaN, <= 0 or '
                   'beyond float32, a negative weight decay, AdamW beta2 = 1, no checkpoints kept',
                   'ValueError naming the field, raised before anything compiles')
def test_bad_config_is_named_before_compiling(data_dir, overrides, message, monkeypatch):
  compiled = []
  monkeypatch.setattr(jax, 'jit', lambda *a, **k: compiled.append(a))
  with pytest.raises(ValueError, match=message):
    Experiment.build(tiny_experiment(data_dir, **overrides))
  assert not compiled


def _refused_switches() -> list[tuple[str, str]]:
  """(family, shared field) for every shared switch a family names as unsupported."""
  return [(name, field) for name in architectures.registry.families()
          for field in getattr(architectures.registry.get_family(name).Config, 'unsupported', {})]


def _another_value(config_class, field: str):
  """A valid value of a shared switch other than the family's default."""
  default = {f.name: f.default for f in dataclasses.fields(config_class)}[field]
  if isinstance(default, bool):
    return not default
  return dict(attention_impl='xla' if default != 'xla' else 'auto', remat='full' if default != 'full' else 'dots',
              input_features=default + 2, logits_soft_cap=default + 30.0)[field]


@pytest.mark.parametrize('family,field', _refused_switches())
@pytest.mark.fault('a shared model switch the family cannot honour (e.g. scan_layers for a family whose layers differ)',
                   'ValueError naming the field, the family and why, raised before anything compiles')
def test_a_shared_switch_a_family_cannot_honour_is_refused_by_name(family, field, data_dir, monkeypatch):
  config = family_tiny_config(family, data_dir)
  config.model[field] = _another_value(architectures.registry.get_family(family).Config, field)
  compiled = []
  monkeypatch.setattr(jax, 'jit', lambda *a, **k: compiled.append(a))
  with pytest.raises(ValueError, match=rf'config\.model\.{field}=.*: \w+ does not support it: \w'):
    Experiment.build(config)
  assert not compiled
