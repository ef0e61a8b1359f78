"""Parameters and optimizer state are placed by their logical axis names.

(That the sharded train step computes what one device computes is checked
for every family in test_family_contract.py.)
"""
import jax

from tests.helpers import tiny_experiment
from trainers.experiment import Experiment


def test_parameters_and_optimizer_state_follow_the_rules(data_dir):
  config = tiny_experiment(data_dir, mesh=dict(data=2, fsdp=2, tensor=2), **{'model.scan_layers': True})
  exp = Experiment.build(config)
  with exp.activate():
    state = exp.new_state()
  gate = state.params['layers']['mlp']['gate']['kernel'][...]  # [layers, embed, mlp], scanned
  assert gate.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')
  assert gate.addressable_shards[0].data.shape == (2, 16, 32)
  mu = state.opt_state[1][0].mu['layers']['mlp']['gate']['kernel'][...]
  assert mu.sharding.spec == gate.sharding.spec  # the optimizer state follows its parameter (cf. flax#5112)
  assert exp.batch_sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'), None)
