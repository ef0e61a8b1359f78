"""Small builders shared by the tests: tiny models and packed rows with several documents."""
import json
import os

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import architectures
from experiments import configs


def tiny_model(**fields) -> architectures.base.SequenceModel:
  """A float32 Transformer small enough for CPU tests; `fields` override config.model."""
  model_fields = dict(name='transformer', vocab_size=64, num_layers=2, dim=32, num_heads=4, num_kv_heads=2,
                      mlp_dim=64, dtype='float32', attention_impl='xla')
  model_fields.update(fields)
  return architectures.create_model(model_fields, nnx.Rngs(0))


def jitted(module, **fixed):
  """`module(*args, **fixed)` as one jitted function of `args`. Called eagerly instead, every op of the
  module compiles on its own, again for every new shape: minutes per test on a CPU."""
  graphdef, state = nnx.split(module)
  fn = jax.jit(lambda s, *args: nnx.merge(graphdef, s)(*args, **fixed))
  return lambda *args: fn(state, *args)


MESH = dict(data=2, fsdp=2, tensor=2)  # the 8 fake CPU devices of the tests


def sharded(fn, *args):
  """fn(*args) jitted under the 8-CPU-device mesh and the default rules (kernels run inside shard_map)."""
  from experiments.configs.common import DEFAULT_SHARDING_RULES
  mesh = jax.make_mesh(tuple(MESH.values()), tuple(MESH), axis_types=(jax.sharding.AxisType.Auto,) * len(MESH))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_SHARDING_RULES):
    return jax.jit(fn)(*args)


def packed_positions(lengths_per_row: list[list[int]], pad_to: int | None = None) -> jnp.ndarray:
  """Positions of rows packing documents of the given lengths (0 at each start), padded with -1."""
  rows = [np.concatenate([np.arange(n) for n in lengths]) for lengths in lengths_per_row]
  width = pad_to or max(len(r) for r in rows)
  return jnp.asarray(np.stack([np.pad(r, (0, width - len(r)), constant_values=-1) for r in rows]), jnp.int32)


def random_tokens(shape: tuple[int, ...], vocab: int, seed: int = 0) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape), jnp.int32)


def tiny_experiment(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """The tiny Transformer experiment shrunk further for tests; data from the embedded corpus in data_dir."""
  from experiments.configs import transformer
  config = transformer.get_config('tiny')
  config.model.update(num_layers=2, dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64)
  config.update(seq_len=32, batch_size=8, total_steps=20, log_every=5, eval_every=10, checkpoint_every=10,
                eval_batches=2)
  config.dataset.data_dir = str(data_dir)
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every experiment config file: a new family is tested as soon as its config exists.
CONFIGS = configs.NAMES
# One config per model class (the config file named after its family): the expensive whole-step
# tests (sharded training, sampling, TPU compilation) run once per code path, not once per preset.
FAMILY_CONFIGS = [name for name in CONFIGS if name in architectures.families()]


def read_metrics(workdir: str) -> list[dict]:
  """The records of a run's metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def family_tiny_config(name: str, data_dir, mesh: dict | None = None) -> ml_collections.ConfigDict:
  """experiments/configs/<name>.py:tiny in float32, with short rows, for CPU tests."""
  config = configs.get(name, 'tiny')
  config.model.dtype = 'float32'
  config.update(seq_len=32, batch_size=8, total_steps=10, mesh=mesh or dict(data=-1, fsdp=1, tensor=1))
  config.dataset.data_dir = str(data_dir)
  return config


def matmul_flops(fn, *args) -> float:
  """FLOPs of every dot_general `fn(*args)` traces (2 per multiply-add; scan bodies times their length, the
  costlier branch of a cond, every other nested jaxpr walked): an independent count to hold the models'
  analytic FLOP formulas to."""
  def count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        (lhs_contract, _), _ = eqn.params['dimension_numbers']
        lhs = eqn.invars[0].aval.shape
        total += 2 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in lhs_contract])
      elif eqn.primitive.name == 'cond':
        total += max(count(branch.jaxpr) for branch in eqn.params['branches'])
      else:
        repeat = eqn.params['length'] if eqn.primitive.name == 'scan' else 1
        total += repeat * sum(count(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
    return total
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def stdlib_slice(num_bytes: int) -> list[bytes]:
  """The first files of the embedded corpus (the standard library's .py files, in sorted path order) holding
  about `num_bytes`, read straight from disk: no corpus build."""
  import pathlib
  import sysconfig
  from trainers.data import local_text
  root = sysconfig.get_paths()['stdlib']
  documents = []
  for relpath in local_text.list_files(root, local_text.STDLIB_PATTERNS, local_text.STDLIB_EXCLUDED_DIRS):
    documents.append(pathlib.Path(root, relpath).read_bytes())
    if sum(map(len, documents)) >= num_bytes:
      break
  return documents
