"""A wrong experiment config fails before anything compiles, naming the field."""
import jax
import pytest

from trainers.experiment import Experiment
from tests.helpers import tiny_experiment


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
    ({'sharding_rules': (('embed', 'fsdp'),)}, r'config\.sharding_rules has no rule for logical axes'),
    ({'mesh': dict(data=4, fsdp=1, tensor=2), 'model.vocab_size': 385},
     r"params\['io'\]\['embed'\]\['table'\].* dimension of 385 .* does not divide over mesh axes \('tensor',\)"),
])
@pytest.mark.fault('a wrong config: unknown family or field, heads not dividing the width, a mesh that does not match '
                   'the devices, a batch not dividing over the data axes, a parameter that does not divide over its '
                   'mesh axes, a non-positive length, a negative prefill chunk',
                   'ValueError naming the field, raised before anything compiles')
def test_bad_config_is_named_before_compiling(data_dir, overrides, message, monkeypatch):
  compiled = []
  monkeypatch.setattr(jax, 'jit', lambda *a, **k: compiled.append(a))
  with pytest.raises(ValueError, match=message):
    Experiment.build(tiny_experiment(data_dir, **overrides))
  assert not compiled
