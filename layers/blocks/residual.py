"""The mixer protocol and the pre-norm residual block every family stacks.

A sequence mixer (attention, RG-LRU block, gated retention, Aaren, RWKV time
mix, GOLD attention, ...) is a module with

  mixer(x [B, T, D], segments, cache[, shared]) -> (y [B, T, D], cache)   (cache None: no decode state)
  mixer.init_cache(batch, max_len, dtype) -> its decode cache (fixed shapes; None if it keeps none)
  mixer.flops_per_token(seq_len, doc_lengths=None) -> forward FLOPs per token (layers/flops.py)

where `segments` (layers/documents.Segments) says where the tokens sit and
`shared` (layers/blocks/shared_keys.SharedKeys) is what the decoder's shared-keys
stage computed for the layers after it (YOCO's shared K/V, GOLD's key and
value streams): only the mixers of those layers take it, and only they are
given it. The block around a mixer is the pre-norm residual (Llama, Gemma,
RWKV):

  h = x + mixer(norm(x));   out = h + mlp(norm(h))

with the family's norm (RMSNorm, zero-centred RMSNorm, LayerNorm) and an MLP
that is either stateless, mlp(x) -> y with flops_per_token(), or follows the
mixer protocol itself (RWKV's channel mix, whose token shift is a cache).
"""
from collections.abc import Callable
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.blocks.shared_keys import SharedKeys
from layers.documents import Segments
from layers.flops import Lengths


class Mixer(Protocol):

  def __call__(self, x: jax.Array, segments: Segments, cache: Any,
               shared: SharedKeys | None = None) -> tuple[jax.Array, Any]:
    ...

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> Any:
    ...

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    ...


@flax.struct.dataclass
class BlockCache:
  """A block's cache when its MLP carries one too (RWKV's channel mix)."""
  mixer: Any  # the mixer's cache
  mlp: Any    # the MLP's cache


class ResidualBlock(nnx.Module):
  """h = x + mixer(norm(x)); out = h + mlp(norm(h)). Its cache is the mixer's, or a BlockCache of both
  when `mlp` follows the mixer protocol (has init_cache)."""

  def __init__(self, dim: int, mixer: Mixer, mlp: nnx.Module, *, norm: Callable[[int], nnx.Module]):
    """`norm(dim)` builds each of the two norms (DecoderConfig.make_norm)."""
    self.mixer_norm = norm(dim)
    self.mixer = mixer
    self.mlp_norm = norm(dim)
    self.mlp = mlp
    self.mlp_cached = hasattr(mlp, 'init_cache')

  def __call__(self, x: jax.Array, segments: Segments, cache: Any = None,
               shared: SharedKeys | None = None) -> tuple[jax.Array, Any]:
    """x [B, T, D] -> [B, T, D], the updated cache; `shared` goes to the mixer (positionally) when given."""
    mixer_cache, mlp_cache = (cache.mixer, cache.mlp) if self.mlp_cached and cache is not None else (cache, None)
    mixed, mixer_cache = self.mixer(self.mixer_norm(x), segments, mixer_cache, *(() if shared is None else (shared,)))
    x = x + mixed
    if self.mlp_cached:
      mixed, mlp_cache = self.mlp(self.mlp_norm(x), segments, mlp_cache)
    else:
      mixed = self.mlp(self.mlp_norm(x))
    x = sharding.constrain(x + mixed, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED))
    if cache is None or not self.mlp_cached:
      return x, mixer_cache
    return x, BlockCache(mixer=mixer_cache, mlp=mlp_cache)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> Any:
    mixer = self.mixer.init_cache(batch, max_len, dtype)
    return BlockCache(mixer=mixer, mlp=self.mlp.init_cache(batch, max_len, dtype)) if self.mlp_cached else mixer

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    mlp = self.mlp.flops_per_token(seq_len, doc_lengths) if self.mlp_cached else self.mlp.flops_per_token()
    return self.mixer.flops_per_token(seq_len, doc_lengths) + mlp
