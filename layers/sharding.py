"""Logical axis names for parameters and activations.

Model code names each array axis logically (`embed`, `heads`, `act_batch`, ...);
the trainer maps the names to mesh axes with one rules table from the config
(`nnx.logical_axis_rules`). Without a mesh or rules every helper is a no-op, so
models also run unsharded in a notebook.
"""
from collections.abc import Callable, Sequence

import flax.core.spmd
import jax
from flax import nnx

# Parameter axes.
EMBED = 'embed'
HEADS = 'heads'
KV_HEADS = 'kv_heads'
HEAD_DIM = 'kv'
MLP = 'mlp'
LRU = 'lru'            # width of a linear recurrence (RG-LRU, ...)
CONV = 'conv'          # taps of a temporal convolution
VOCAB = 'vocab'
LAYERS = 'layers'
NORM = 'norm'
# Activation axes.
ACT_BATCH = 'act_batch'
ACT_LENGTH = 'act_length'
ACT_EMBED = 'act_embed'
ACT_HEADS = 'act_heads'
ACT_KV_HEADS = 'act_kv_heads'
ACT_MLP = 'act_mlp'
ACT_VOCAB = 'act_vocab'

PARAM_AXES = (EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, LRU, CONV, VOCAB, LAYERS, NORM)
ACTIVATION_AXES = (ACT_BATCH, ACT_LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB)


def partitioned(init: Callable, names: Sequence[str | None]) -> Callable:
  """Wraps an initialiser so its Param carries logical axis names.

  Eager sharding is off: parameters are created unsharded (no mesh needed) and
  the trainer places them with `jax.jit(..., out_shardings=...)`.
  """
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def logical_to_mesh(names: Sequence[str | None], rules) -> jax.sharding.PartitionSpec:
  """Maps logical axis names to a PartitionSpec; a name without a rule is an error."""
  table = dict(rules)
  missing = [n for n in names if n is not None and n not in table]
  if missing:
    raise ValueError(f'no sharding rule for logical axes {missing}; add them to config.sharding_rules')
  return jax.sharding.PartitionSpec(*(None if n is None else table[n] for n in names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names, under the active mesh and rules."""
  rules = flax.core.spmd.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh(names, rules))
