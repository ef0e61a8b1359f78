"""Device mesh and logical-to-mesh sharding for the train state and batches.

`config.mesh` maps axis names (data, fsdp, tensor, ...) to sizes, one of which
may be -1 (the rest of the devices); `config.sharding_rules` maps the logical
axis names of layers/sharding.py to mesh axes. Parameters and optimizer state
get their shardings from their logical names; a batch is split over the axes
that `act_batch` maps to.
"""
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from layers import sharding

MESH_AXES = ('data', 'fsdp', 'tensor', 'sequence')
BATCH_AXES = (sharding.ACT_BATCH, None)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves -1 and checks the mesh against the device count; messages name config.mesh."""
  unknown = [name for name in mesh_config if name not in MESH_AXES]
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {unknown}; known: {MESH_AXES}')
  sizes = {name: int(size) for name, size in mesh_config.items()}
  rest = [name for name, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise ValueError(f'config.mesh: only one axis may be -1, got {rest}')
  if any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f'config.mesh: sizes must be positive or -1, got {sizes}')
  known = int(np.prod([size for size in sizes.values() if size != -1]))
  if rest:
    if num_devices % known:
      raise ValueError(f'config.mesh={sizes}: the fixed axes ({known} devices) do not divide the {num_devices} devices')
    sizes[rest[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(f'config.mesh={sizes} needs {known} devices but {num_devices} are available')
  return sizes


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  names = tuple(sizes)
  return jax.make_mesh(tuple(sizes.values()), names, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def rules_table(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
  """config.sharding_rules (pairs of logical name, mesh axis / tuple / None) as a tuple."""
  return tuple((str(name), tuple(axis) if isinstance(axis, (list, tuple)) else axis) for name, axis in rules)


def batch_sharding(mesh: jax.sharding.Mesh, rules) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, sharding.logical_to_mesh(BATCH_AXES, rules))


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh, rules) -> Any:
  """NamedShardings for a pytree holding nnx Variables (by logical names) and plain arrays (replicated)."""
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(abstract_state)
  return jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def batch_axis_shardings(make_tree: Callable[[int], Any], batch: int, mesh: jax.sharding.Mesh, rules) -> Any:
  """Shardings that split each leaf of `make_tree(batch)` along its batch axis (e.g. a decode cache).

  The batch axis of a leaf is the one whose size changes when the batch
  doubles, so no family has to declare its cache layout.
  """
  spec = sharding.logical_to_mesh(BATCH_AXES, rules)[0]
  one, two = (jax.eval_shape(lambda: make_tree(b)) for b in (batch, 2 * batch))

  def leaf_sharding(a, b):
    axes = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    entries = [None] * len(a.shape)
    if axes:
      entries[axes[0]] = spec
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*entries))

  return jax.tree.map(leaf_sharding, one, two)


def check_divisible(abstract_state: Any, shardings: Any) -> None:
  """Every sharded dimension must divide evenly over its mesh axes; the message names the array."""
  flat_state = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  for (path, leaf), named in zip(flat_state, flat_shardings):
    for dim, axes in zip(leaf.shape, named.spec):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      ways = int(np.prod([named.mesh.shape[a] for a in axes]))
      if dim % ways:
        raise ValueError(f'{jax.tree_util.keystr(path)} has a dimension of {dim} that does not divide over '
                         f'mesh axes {axes} ({ways} ways); change config.mesh, config.sharding_rules or the model size')
