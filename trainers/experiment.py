"""Everything a binary derives from a config before touching data or devices'
memory: validation, the mesh, the optimizer, the model's graph and the
shardings of the train state and of a batch. Train, evaluate and sample
share it, so they agree on how a checkpoint is laid out.
"""
import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import optax
from flax import nnx
from ml_collections import ConfigDict

from architectures.base import SequenceModel
from trainers import config_validation, partitioning
from trainers.training import train_state
from trainers.training.optimizer import make_optimizer


@dataclasses.dataclass
class Experiment:
  config: ConfigDict
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  graphdef: nnx.GraphDef
  abstract_model: SequenceModel
  abstract_state: Any
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding

  @classmethod
  def build(cls, config: ConfigDict, devices: Sequence[jax.Device] | None = None) -> 'Experiment':
    """Validates the config and lays out the state over `devices` (default: all); nothing is compiled."""
    # XLA on GPU inlines the threefry hash into every parameter's init fusion: a 1B model's init
    # compiled for minutes, seconds with jax's CUDA threefry kernel (same bits; docs/performance.md).
    jax.config.update('jax_threefry_gpu_kernel_lowering', True)
    devices = list(jax.devices() if devices is None else devices)
    config_validation.validate(config, len(devices))
    mesh = partitioning.make_mesh(config.mesh, devices)
    rules = partitioning.rules_table(config.sharding_rules)
    tx, schedule = make_optimizer(config)
    graphdef, abstract_model = train_state.model_graphdef(config)
    abstract_state = jax.eval_shape(train_state.init_fn(config, tx))
    shardings = partitioning.state_shardings(abstract_state, mesh, rules)
    if train_state.streaming(config):
      shardings = shardings.replace(carry=partitioning.batch_axis_shardings(
          lambda batch: train_state.new_carry(abstract_model, config, batch), config.batch_size, mesh, rules))
    partitioning.check_divisible(abstract_state, shardings)
    return cls(config, mesh, rules, tx, schedule, graphdef, abstract_model, abstract_state, shardings,
               partitioning.batch_sharding(mesh, rules))

  @contextlib.contextmanager
  def activate(self):
    """The mesh and logical axis rules that sharding constraints in the model resolve against."""
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      yield

  def new_state(self) -> train_state.TrainState:
    return train_state.create_sharded(train_state.init_fn(self.config, self.tx), self.state_shardings)

  def restore_target(self) -> Any:
    """ShapeDtypeStructs with the state's shardings, for orbax to restore onto."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_shardings)

  def device_batch(self, batch: dict) -> dict:
    """Host arrays (this process's rows) -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}
