"""Ahead-of-time compilation for real TPU topologies on any host (no TPU needed).

With libtpu installed (`pip install -e '.[tpu]'`), JAX describes a TPU
topology (e.g. 'v5e:2x4') as abstract devices; the config's mesh is laid over
them, and the sharded train step and one decode step are lowered and compiled
for that chip, exactly as MaxText's train_compile does. The compiled
executables report per-chip memory, checked against the chip's HBM.
"""
import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from ml_collections import ConfigDict

from trainers import partitioning
from trainers.experiment import Experiment
from trainers.training.jitted_step import TrainStep

HBM_BYTES = {'v4': 32 << 30, 'v5e': 16 << 30, 'v5p': 95 << 30, 'v6e': 32 << 30}


def topology_devices(topology: str) -> list:
  """'v5e:2x4' -> its chips as abstract TPU devices."""
  return list(topologies.get_topology_desc(topology_name=topology, platform='tpu').devices)


def _memory(compiled) -> dict:
  stats = compiled.memory_analysis()
  per_chip = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes \
      + stats.temp_size_in_bytes
  return dict(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
              aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes, total=per_chip)


def compile_train_step(exp: Experiment, batch_size: int, seq_len: int):
  """The sharded, donated train step compiled for the experiment's (TPU) mesh."""
  batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32, sharding=exp.batch_sharding)
           for k in ('tokens', 'positions')}
  step = TrainStep(exp)
  return step.lower(step.leaves(exp.restore_target()), batch).compile()


def compile_decode_step(exp: Experiment, batch_size: int, context: int):
  """One token of cached decoding (batch over the batch axes) compiled for the mesh."""
  model = exp.abstract_model
  params = exp.restore_target().params
  cache_shardings = partitioning.batch_axis_shardings(
      lambda b: model.init_cache(b, context, jnp.bfloat16), batch_size, exp.mesh, exp.rules)
  cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       jax.eval_shape(lambda: model.init_cache(batch_size, context, jnp.bfloat16)), cache_shardings)
  token = jax.ShapeDtypeStruct((batch_size, 1), jnp.int32, sharding=exp.batch_sharding)
  step = jax.jit(lambda p, t, q, c: nnx.merge(exp.graphdef, p)(t, q, c), donate_argnums=3)
  return step.lower(params, token, token, cache).compile()


def compile_report(config: ConfigDict, topology: str, *, decode_context: int | None = None) -> dict:
  """Compiles train and decode steps of `config` for `topology`; memory per chip and whether it fits."""
  devices = topology_devices(topology)
  exp = Experiment.build(config, devices)
  hbm = HBM_BYTES.get(topology.split(':')[0])
  with exp.activate():
    train = _memory(compile_train_step(exp, config.batch_size, config.seq_len))
    decode = _memory(compile_decode_step(exp, config.batch_size, decode_context or config.seq_len))
  return dict(topology=topology, chips=len(devices), device_kind=devices[0].device_kind, mesh=dict(exp.mesh.shape),
              batch_size=config.batch_size, seq_len=config.seq_len, hbm_bytes=hbm,
              train_step=dict(train, fits=None if hbm is None else train['total'] <= hbm),
              decode_step=dict(decode, fits=None if hbm is None else decode['total'] <= hbm))


def largest_batch(config: ConfigDict, topology: str, *, limit: int = 1 << 14) -> int | None:
  """The largest batch (doubling from config.batch_size) whose train step fits the chip's HBM."""
  devices = topology_devices(topology)
  hbm = HBM_BYTES[topology.split(':')[0]]
  best, batch = None, config.batch_size
  while batch <= limit:
    trial = ConfigDict(config.to_dict())
    trial.batch_size = batch
    exp = Experiment.build(trial, devices)
    with exp.activate():
      try:
        fits = _memory(compile_train_step(exp, batch, trial.seq_len))['total'] <= hbm
      except jax.errors.JaxRuntimeError as error:  # the TPU compiler refuses a program over HBM
        if 'RESOURCE_EXHAUSTED' not in str(error):
          raise
        fits = False
    if not fits:
      break
    best, batch = batch, batch * 2
  return best
