"""A stack of identical layers, looped in Python or scanned, with optional remat.

`scan=True` creates the layers with a leading `layers` axis (nnx.vmap) and runs
them with one `jax.lax.scan`, so compile time does not grow with depth; the
per-layer decode caches are stacked the same way. `remat` names a
`jax.checkpoint` policy that decides what the backward pass recomputes.
Each layer follows the mixer protocol (layers/blocks/residual.py): `init_caches` and
`flops_per_token` ask the layers themselves, and a stack says itself whether it
is scanned (an nnx.List is looped) and how deep it is.

Layers of a repeating pattern of unlike blocks (Griffin's recurrent,
recurrent, attention) are built in groups (`create_groups`): each group, one
period of the pattern, is one `LayerGroup` layer, so the groups are alike and
scan; the blocks that do not fill a whole period form a `tail` stack.
"""
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.blocks.shared_keys import SharedKeys
from layers.documents import Segments
from layers.flops import Lengths

REMAT_POLICIES: dict[str, Any] = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

LayerFn = Callable[[nnx.Module, jax.Array, Any], tuple[jax.Array, Any]]
# make_block(kind, layer index in the model (traced when scanned), rngs) -> the block of that kind.
MakeBlock = Callable[[str, int | jax.Array, nnx.Rngs], nnx.Module]


def create_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
                  rngs: nnx.Rngs, *, scan: bool) -> nnx.Module:
  """Builds `num_layers` layers: stacked on a leading axis if `scan`, else a list."""
  return create_indexed_layers(lambda index, layer_rngs: make_layer(layer_rngs), range(num_layers), rngs, scan=scan)


def create_indexed_layers(make_layer: Callable[[int | jax.Array, nnx.Rngs], nnx.Module], indices: range,
                          rngs: nnx.Rngs, *, scan: bool) -> nnx.Module:
  """`create_layers` for layers whose initial values depend on their depth: each is built as
  make_layer(its index in the model, rngs). Scanned, the index is a traced int32 (one per stacked layer)."""
  if not scan:
    return nnx.List([make_layer(index, rngs) for index in indices])

  @nnx.split_rngs(splits=len(indices))
  @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: sharding.LAYERS})
  def make_stacked(layer_rngs: nnx.Rngs, index: jax.Array) -> nnx.Module:
    return make_layer(index, layer_rngs)

  return make_stacked(rngs, jnp.arange(indices.start, indices.stop, dtype=jnp.int32))


class LayerGroup(nnx.Module):
  """Consecutive blocks, one per kind of `kinds` (one period of a block pattern): one layer of the mixer
  protocol whose cache is the tuple of its blocks' caches."""

  def __init__(self, make_block: MakeBlock, kinds: Sequence[str], first: int | jax.Array, rngs: nnx.Rngs):
    """Block i is make_block(kinds[i], first + i, rngs): `first` is the group's first layer index in the model."""
    self.blocks = nnx.List([make_block(kind, first + i, rngs) for i, kind in enumerate(kinds)])

  def __call__(self, x: jax.Array, segments: Segments, caches: tuple | None,
               shared: SharedKeys | None = None) -> tuple[jax.Array, tuple | None]:
    """x [B, T, D] -> [B, T, D], the blocks' updated caches."""
    new_caches = []
    for i, block in enumerate(self.blocks):
      x, cache = block(x, segments, None if caches is None else caches[i], shared)
      new_caches.append(cache)
    return x, (None if caches is None else tuple(new_caches))

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> tuple:
    return tuple(block.init_cache(batch, max_len, dtype) for block in self.blocks)

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    return sum(block.flops_per_token(seq_len, doc_lengths) for block in self.blocks)


def create_groups(make_block: MakeBlock, pattern: Sequence[str], num_layers: int, rngs: nnx.Rngs, *,
                  scan: bool) -> tuple[nnx.Module, nnx.List]:
  """`num_layers` blocks of kinds `pattern` cycled, make_block(kind, layer index, rngs) each (the index is traced
  in scanned groups): (the groups, one LayerGroup per whole period, stacked if `scan`; the tail, a list of one
  LayerGroup of the remaining blocks, or empty)."""
  period = len(pattern)
  num_groups, tail = divmod(num_layers, period)
  groups = create_indexed_layers(lambda g, r: LayerGroup(make_block, pattern, g * period, r), range(num_groups),
                                 rngs, scan=scan and num_groups > 0)
  return groups, create_indexed_layers(lambda g, r: LayerGroup(make_block, pattern[:tail], num_groups * period, r),
                                       range(int(tail > 0)), rngs, scan=False)


def scanned(layers: nnx.Module) -> bool:
  """The layers are stacked on a leading axis (create_layers with scan), not a list."""
  return not isinstance(layers, nnx.List)


def depth(layers: nnx.Module | None) -> int:
  """How many layers the stack holds (0 for None)."""
  if layers is None:
    return 0
  if not scanned(layers):
    return len(layers)
  return jax.tree.leaves(nnx.state(layers, nnx.Param))[0].shape[0]


def apply_layers(layers: nnx.Module, x: jax.Array, caches: Any, layer_fn: LayerFn, *,
                 remat: str) -> tuple[jax.Array, Any]:
  """Runs x through every layer; `caches` is per layer (stacked when scanned) or None."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f'unknown remat policy {remat!r}; known: {sorted(REMAT_POLICIES)}')

  def one_layer(graphdef, state, h, cache):
    return layer_fn(nnx.merge(graphdef, state), h, cache)

  if remat != 'none':
    one_layer = jax.checkpoint(one_layer, policy=REMAT_POLICIES[remat], static_argnums=(0,))

  if scanned(layers):
    graphdef, state = nnx.split(layers)

    def body(h, layer_inputs):
      layer_state, cache = layer_inputs
      return one_layer(graphdef, layer_state, h, cache)

    return jax.lax.scan(body, x, (state, caches))

  new_caches = []
  for i, layer in enumerate(layers):
    graphdef, state = nnx.split(layer)
    x, cache = one_layer(graphdef, state, x, None if caches is None else caches[i])
    new_caches.append(cache)
  return x, (None if caches is None else new_caches)


def stack_caches(cache: Any, num_layers: int) -> Any:
  """One layer's cache -> the stacked cache of `num_layers` scanned layers."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_layers, *a.shape)), cache)


def init_caches(layers: nnx.Module, batch: int, max_len: int, dtype: jnp.dtype) -> Any:
  """Every layer's decode cache: stacked on a leading axis when scanned (shapes from the stacked layer), else a
  list."""
  if scanned(layers):
    return stack_caches(layers.init_cache(batch, max_len, dtype), depth(layers))
  return [layer.init_cache(batch, max_len, dtype) for layer in layers]


def flops_per_token(layers: nnx.Module, seq_len: int, doc_lengths: Lengths | None) -> float:
  """Forward FLOPs per token of all the layers (scanned layers are all alike)."""
  if scanned(layers):
    return depth(layers) * layers.flops_per_token(seq_len, doc_lengths)
  return sum(layer.flops_per_token(seq_len, doc_lengths) for layer in layers)
