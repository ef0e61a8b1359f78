"""Where a Pallas kernel (Mosaic on TPU, Triton on GPU) runs, and how it sees sharded arrays.

The platform is read from the mesh made active by `jax.set_mesh`, so that
compiling for an abstract TPU topology on a CPU host selects the TPU kernels;
without a mesh it is the default backend. XLA cannot partition a Pallas
kernel, so under a mesh the kernel runs inside `jax.shard_map`, one block per
device, split along the mesh axes that the logical axis rules give.
"""
from collections.abc import Callable, Sequence
from typing import Any

import flax.core.spmd
import jax
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from layers import sharding


def compile_platform() -> str:
  """'tpu', 'gpu' or 'cpu': the active mesh's devices, else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return jax.default_backend() if device is None else device.platform


def checked_platform(operator: str, impl: str, known: tuple[str, ...], on_tpu: str) -> str:
  """The platform compiled for, after checking that `impl` is one of `known` and that 'fused' (a Pallas Triton
  kernel) is not asked of a TPU; `on_tpu` names what to use there instead."""
  if impl not in known:
    raise ValueError(f'unknown {operator} impl {impl!r}; known: {known}')
  platform = compile_platform()
  if impl == 'fused' and platform == 'tpu':
    raise ValueError(f"{operator} impl 'fused' is a Pallas Triton kernel for GPUs; on TPU use {on_tpu}")
  return platform


def triton_call(kernel: Callable, out_shape: Any, grid: tuple[int, ...], num_warps: int, name: str) -> Callable:
  """pl.pallas_call of a Pallas Triton kernel over whole arrays (no BlockSpecs); in interpret mode off GPU."""
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, name=name,
                        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=1),
                        interpret=compile_platform() != 'gpu')


def mesh_axes(logical: str, size: int) -> tuple[str, ...]:
  """Mesh axes that split an axis of `size` named `logical` (() when unsplit, no mesh or not dividing)."""
  rules = flax.core.spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return ()
  axes = sharding.logical_to_mesh((logical,), rules)[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return axes if size % int(np.prod([mesh.shape[a] for a in axes])) == 0 else ()


def shards(axes: tuple[str, ...]) -> tuple[jax.Array | int, int]:
  """(index of this block, number of blocks) along `axes`, inside `run_sharded`."""
  if not axes:
    return 0, 1
  return jax.lax.axis_index(axes), int(np.prod([jax.sharding.get_abstract_mesh().shape[a] for a in axes]))


def spec(axes_per_dim: Sequence[tuple[str, ...]]) -> jax.sharding.PartitionSpec:
  """A PartitionSpec from the mesh axes of each dimension (() = not split)."""
  return jax.sharding.PartitionSpec(*(a if a else None for a in axes_per_dim))


def run_sharded(kernel: Callable, args: tuple, in_specs: tuple, out_specs: Any) -> Any:
  """kernel(*args) per device block under the active mesh (in_specs / out_specs: PartitionSpecs); plain without one."""
  if jax.sharding.get_abstract_mesh().empty:
    return kernel(*args)
  return jax.shard_map(kernel, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
