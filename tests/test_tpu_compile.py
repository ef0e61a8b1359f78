"""Every family's tiny config compiles for a real TPU topology (v5e 2x4, a
data=2 x fsdp=2 x tensor=2 mesh) on this CPU-only host, train step and decode
step, with the input shardings the partitioning rules ask for."""
import jax
import numpy as np
import pytest

from tests.helpers import FAMILY_CONFIGS, family_tiny_config
from trainers.experiment import Experiment
from trainers.measurement.tpu_compile import HBM_BYTES, compile_decode_step, compile_report, compile_train_step, topology_devices
from trainers.training.jitted_step import TrainStep

TOPOLOGY = 'v5e:2x4'
MESH = dict(data=2, fsdp=2, tensor=2)


def shard_bytes(compiled: jax.stages.Compiled) -> int:
  """Bytes of one chip's shards of the compiled program's arguments, without layout padding."""
  infos, shardings = jax.tree.leaves(compiled.args_info), jax.tree.leaves(compiled.input_shardings)
  return sum(int(np.prod(s.shard_shape(info.shape))) * np.dtype(info.dtype).itemsize
             for info, s in zip(infos, shardings, strict=True))


def test_topology_gives_abstract_tpu_chips():
  devices = topology_devices(TOPOLOGY)
  assert len(devices) == 8 and 'TPU' in devices[0].device_kind and devices[0].platform == 'tpu'


@pytest.mark.parametrize('name', [pytest.param(name, marks=pytest.mark.slow) if name == 'goldfinch' else name
                                  for name in FAMILY_CONFIGS])  # goldfinch: the longest compile
def test_family_compiles_for_tpu_with_the_rules_shardings(name, data_dir):
  config = family_tiny_config(name, data_dir, MESH)
  config.model.dtype = 'bfloat16'
  exp = Experiment.build(config, topology_devices(TOPOLOGY))
  with exp.activate():
    train = compile_train_step(exp, config.batch_size, config.seq_len)
    decode = compile_decode_step(exp, config.batch_size, 64)
  leaf_shardings, batch_sharding = train.input_shardings[0]
  state_shardings = TrainStep(exp).state(leaf_shardings)
  for sharding in jax.tree.leaves(batch_sharding):  # tokens, positions
    assert sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'), None)
  by_path = {jax.tree_util.keystr(path): s for path, s in jax.tree_util.tree_flatten_with_path(state_shardings.params)[0]}
  table = next(s for path, s in by_path.items() if "['io']['embed']['table']" in path)  # [vocab, embed]
  assert table.spec == jax.sharding.PartitionSpec('tensor', 'fsdp')
  assert table.mesh.devices.flat[0].platform == 'tpu'
  for compiled in (train, decode):
    # A chip holds its shard of every argument (state, batch; the cache when decoding), counted here from the
    # compiled input shardings; TPU tiled layouts pad small trailing dims, at most doubling these tiny arrays.
    unpadded = shard_bytes(compiled)
    assert unpadded <= compiled.memory_analysis().argument_size_in_bytes <= 2 * unpadded < HBM_BYTES['v5e']


def test_compile_report_checks_the_fit(data_dir):
  report = compile_report(family_tiny_config('transformer', data_dir, MESH), TOPOLOGY)
  assert report['device_kind'].startswith('TPU v5') and report['mesh'] == MESH
  assert report['train_step']['fits'] and report['train_step']['total'] > report['train_step']['temporaries'] > 0
