"""The train step on an 8-device mesh (data=2, fsdp=2, tensor=2) equals one device.

Tolerance: float32 compute; the sharded program sums in a different order
(partial sums per shard, then all-reduce), so results agree to ~1e-6, not bitwise.
"""
import jax
import numpy as np
import pytest

from trainers import steps
from trainers.experiment import Experiment
from tests.helpers import packed_positions, random_tokens, tiny_experiment


def run_two_steps(config, devices):
  exp = Experiment.build(config, devices)
  batch = dict(tokens=np.asarray(random_tokens((8, 33), 257)),
               positions=np.asarray(packed_positions([[33], [10, 23], [33], [5, 28]] * 2)))
  with exp.activate():
    state = exp.new_state()
    step = jax.jit(steps.make_train_step(exp.graphdef, exp.tx, exp.schedule),
                   in_shardings=(exp.state_shardings, exp.batch_sharding), out_shardings=(exp.state_shardings, None))
    losses = []
    for _ in range(2):
      state, metrics = step(state, exp.device_batch(batch))
      losses.append(float(metrics['loss']))
  return state, losses


@pytest.fixture(scope='module')
def runs(data_dir):
  assert jax.device_count() == 8, 'tests/conftest.py sets 8 CPU devices'
  model = {'model.dtype': 'float32', 'model.scan_layers': True}  # scanned: the stacked `layers` axis too
  single = run_two_steps(tiny_experiment(data_dir, mesh=dict(data=1, fsdp=1, tensor=1), **model), jax.devices()[:1])
  sharded = run_two_steps(tiny_experiment(data_dir, mesh=dict(data=2, fsdp=2, tensor=2), **model), jax.devices())
  return single, sharded


def test_sharded_step_matches_one_device(runs):
  (single_state, single_losses), (sharded_state, sharded_losses) = runs
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(single_state.params), jax.tree.leaves(sharded_state.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_parameters_are_sharded_by_their_logical_axes(runs):
  _, (state, _) = runs
  gate = state.params['layers']['mlp']['gate']['kernel'][...]  # [layers, embed, mlp]
  assert gate.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')
  assert gate.addressable_shards[0].data.shape == (2, 16, 32)
  mu = state.opt_state[1][0].mu['layers']['mlp']['gate']['kernel'][...]
  assert mu.sharding.spec == gate.sharding.spec  # the optimizer state follows its parameter
