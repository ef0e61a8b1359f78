"""A stack of identical layers, looped in Python or scanned, with optional remat.

`scan=True` creates the layers with a leading `layers` axis (nnx.vmap) and runs
them with one `jax.lax.scan`, so compile time does not grow with depth; the
per-layer decode caches are stacked the same way. `remat` names a
`jax.checkpoint` policy that decides what the backward pass recomputes.
Each layer follows the mixer protocol (layers/residual.py): `init_caches` and
`flops_per_token` ask the layers themselves.
"""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.flops import Lengths

REMAT_POLICIES: dict[str, Any] = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

LayerFn = Callable[[nnx.Module, jax.Array, Any], tuple[jax.Array, Any]]


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


def apply_layers(layers: nnx.Module, x: jax.Array, caches: Any, layer_fn: LayerFn, *,
                 scan: bool, remat: str) -> tuple[jax.Array, Any]:
  """Runs x through every layer; `caches` is per layer (stacked when `scan`) or None."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f'unknown remat policy {remat!r}; known: {sorted(REMAT_POLICIES)}')

  def one_layer(graphdef, state, h, cache):
    return layer_fn(nnx.merge(graphdef, state), h, cache)

  if remat != 'none':
    one_layer = jax.checkpoint(one_layer, policy=REMAT_POLICIES[remat], static_argnums=(0,))

  if scan:
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


def init_caches(layers: nnx.Module, num_layers: int, batch: int, max_len: int, dtype: jnp.dtype, *,
                scan: bool) -> Any:
  """Every layer's decode cache: stacked on a leading axis when `scan` (shapes from the stacked layer), else a list."""
  if scan:
    return stack_caches(layers.init_cache(batch, max_len, dtype), num_layers)
  return [layer.init_cache(batch, max_len, dtype) for layer in layers]


def flops_per_token(layers: nnx.Module, num_layers: int, seq_len: int, doc_lengths: Lengths | None, *,
                    scan: bool) -> float:
  """Forward FLOPs per token of all the layers (scanned layers are all alike)."""
  if scan:
    return num_layers * layers.flops_per_token(seq_len, doc_lengths)
  return sum(layer.flops_per_token(seq_len, doc_lengths) for layer in layers)
