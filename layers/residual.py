"""The mixer protocol and the pre-norm residual block every family stacks.

A sequence mixer (attention, RG-LRU block, gated retention, Aaren, RWKV time
mix, ...) is a module with

  mixer(x [B, T, D], segments, cache) -> (y [B, T, D], cache)   (cache None: no decode state)
  mixer.init_cache(batch, max_len, dtype) -> its decode cache (fixed shapes)
  mixer.flops_per_token(seq_len, doc_lengths=None) -> forward FLOPs per token (layers/flops.py)

where `segments` (layers/documents.Segments) says where the tokens sit. The
block around it is the Llama / Gemma pre-norm residual:

  h = x + mixer(RMSNorm(x));   out = h + MLP(RMSNorm(h))
"""
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.documents import Segments
from layers.flops import Lengths
from layers.norms import RMSNorm


class Mixer(Protocol):

  def __call__(self, x: jax.Array, segments: Segments, cache: Any) -> tuple[jax.Array, Any]:
    ...

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> Any:
    ...

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    ...


class ResidualBlock(nnx.Module):
  """h = x + mixer(RMSNorm(x)); out = h + mlp(RMSNorm(h)); `mlp` maps [B, T, D] -> [B, T, D] statelessly."""

  def __init__(self, dim: int, mixer: Mixer, mlp: nnx.Module, *, norm_eps: float, zero_centered_norm: bool = False,
               param_dtype: jnp.dtype = jnp.float32):
    norm = dict(eps=norm_eps, zero_centered=zero_centered_norm, param_dtype=param_dtype)
    self.mixer_norm = RMSNorm(dim, **norm)
    self.mixer = mixer
    self.mlp_norm = RMSNorm(dim, **norm)
    self.mlp = mlp

  def __call__(self, x: jax.Array, segments: Segments, cache: Any = None) -> tuple[jax.Array, Any]:
    """x [B, T, D] -> [B, T, D], the mixer's updated cache."""
    mixed, cache = self.mixer(self.mixer_norm(x), segments, cache)
    x = x + mixed
    x = x + self.mlp(self.mlp_norm(x))
    return sharding.constrain(x, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED)), cache

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> Any:
    return self.mixer.init_cache(batch, max_len, dtype)

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    return self.mixer.flops_per_token(seq_len, doc_lengths) + self.mlp.flops_per_token()
