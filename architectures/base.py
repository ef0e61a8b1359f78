"""The interface every family implements, and what they share.

A model is an `nnx.Module` with

  __call__(tokens [B, T] int32, positions [B, T] int32, cache=None, *, last_only=False, capped=True)
      -> (logits [B, T, V] float32 ([B, 1, V] with last_only: a prefill needs only the last), cache)
      (capped=False: logits before the soft cap `logits_soft_cap`, which the training loss applies)
  init_cache(batch, max_len, dtype) -> cache   (a pytree of fixed shapes, for contexts of up to max_len tokens)
  prefill(tokens, positions, cache, chunk) -> (logits [B, 1, V], cache)   (a prompt, in chunks of `chunk`)
  cache_bytes(batch, context_len, dtype) -> int
  flops_per_token(seq_len, doc_lengths=None) -> float
      (forward FLOPs, MaxText-style; attention over the documents of `doc_lengths`, else one a row)

`positions` restart at 0 at each document start and are -1 on padding; a
cache continues the sequence, so prefill + single steps equals one call.
Each family's config is a frozen dataclass built from `config.model` of the
experiment config; unknown or inconsistent fields fail here, before any compile.
Most families are an architectures/decoder.Decoder: a stack of mixers in
pre-norm residual blocks (layers/blocks/residual.py).
"""
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.blocks.kv_cache import KVCache
from layers.documents import Cursor
from layers.flops import Lengths
from layers.mixers.gold_attention import GoldKeyCache


# XLA's GPU pipeline rewrites a dot with a vector operand below 10M elements (every projection of a
# batch-1 decode step) into a multiply and a column reduction; for wide projections the GEMM library's
# matrix-vector product is faster. The families whose batch-1 decode measured faster without the
# rewrite use these options (docs/performance.md, "Inference"); other platforms have no such pass.
DECODE_GEMV_OPTIONS = {'xla_disable_hlo_passes': 'dot-strength-reduction'}


class ConfigError(ValueError):
  """A model config field is wrong; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Base of the per-family config dataclasses (fields are `config.model.<name>`).

  `runtime_fields` change how the model computes, not its parameters: a run
  may resume with different values (e.g. on another accelerator).
  """

  runtime_fields: ClassVar[tuple[str, ...]] = ('dtype', 'attention_impl', 'remat')

  # 0: byte/token inputs and logits; F > 0: F continuous features in, the next step's F out (forecasting).
  input_features: int = 0

  @classmethod
  def from_mapping(cls, fields: Mapping[str, Any]) -> 'ModelConfig':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known - {'name'})
    if unknown:
      raise ConfigError(f'config.model has unknown fields {unknown} for {cls.__name__}; known: {sorted(known)}')
    return cls(**{k: v for k, v in fields.items() if k in known})

  def check(self, condition: bool, field: str, message: str) -> None:
    if not condition:
      raise ConfigError(f'config.model.{field}={getattr(self, field)!r}: {message}')

  def check_positive(self, *fields: str) -> None:
    for field in fields:
      self.check(getattr(self, field) > 0, field, 'must be positive')

  def check_dtype(self, field: str) -> None:
    try:
      jnp.dtype(getattr(self, field))
    except TypeError:
      self.check(False, field, 'not a dtype name')


@flax.struct.dataclass
class ModelCache:
  """Decode cache: where the row is (cursor), each layer's state, and the context it was built for."""
  cursor: Cursor
  layers: Any
  max_len: int = flax.struct.field(pytree_node=False, default=0)  # init_cache's max_len (static)

  def overflowed(self) -> jax.Array:
    """bool []: a cache that keeps every token (a global KV cache, YOCO's shared K/V, GOLD's key cache) was
    written past max_len. Its slots are then reused (token i in slot i mod max_len) and attention silently
    loses the oldest tokens: a caller that feeds a cache over several calls checks this and refuses the result
    (the sampler sizes its cache so that it never does). Rings of a window and recurrent states do not overflow.
    Jit-safe: nothing is read back here."""
    caches = jax.tree.leaves(self.layers, is_leaf=lambda c: isinstance(c, (KVCache, GoldKeyCache)))
    if not any(isinstance(c, GoldKeyCache) or isinstance(c, KVCache) and c.keeps_all for c in caches):
      return jnp.zeros((), bool)
    return jnp.any(self.cursor.next_index > self.max_len)


class AttentionHeads:
  """Mixin for configs with dim, num_heads, num_kv_heads (0 = MHA) and head_dim (0 = dim / num_heads)."""

  def check_heads(self) -> None:
    if not self.head_dim:
      self.check(self.dim % self.num_heads == 0, 'num_heads',
                 f'does not divide config.model.dim={self.dim} (or set config.model.head_dim)')
    self.check(self.num_kv_heads >= 0, 'num_kv_heads', 'must be >= 0')
    self.check(self.num_heads % self.kv_heads == 0, 'num_kv_heads', f'must divide config.model.num_heads={self.num_heads}')

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def heads_dim(self) -> int:
    return self.head_dim or self.dim // self.num_heads


class SequenceModel(nnx.Module):
  """Base class: families implement __call__, init_cache and flops_per_token, and keep their ends
  (embedding in, logits out) in `self.io`, a TokenIO or SeriesIO (layers/blocks/model_io.py)."""

  Config: ClassVar[type[ModelConfig]]
  # False where left padding changes a row's result (block-recurrent windows are aligned to the
  # row's token index, so padding moves the window boundaries): the sampler then decodes prompts
  # of different lengths in separate batches.
  left_padding_invariant: ClassVar[bool] = True
  # XLA options for the sampler's generation program (trainers/inference/sampling.generation_program); see
  # DECODE_GEMV_OPTIONS for the one families use.
  decode_compiler_options: ClassVar[dict[str, str]] = {}

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype = jnp.bfloat16) -> ModelCache:
    raise NotImplementedError

  @property
  def logits_soft_cap(self) -> float:
    """c > 0: logits are c * tanh(z / c) of the projection's z; 0: no cap."""
    return self.io.logits_soft_cap

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    raise NotImplementedError

  def prefill(self, tokens: jax.Array, positions: jax.Array, cache: ModelCache,
              chunk: int = 0) -> tuple[jax.Array, ModelCache]:
    """Writes a prompt (tokens, positions [B, P]) into `cache`: its last position's logits [B, 1, V], the cache.

    chunk = 0: the prompt in one call; into a cache that holds none of its documents, attention
    runs through the training kernels (cuDNN, splash), O(P) memory where they apply.
    chunk = C > 0: C tokens per call, each written into the cache before the next (the first call
    takes the P mod C remainder, then one lax.scan over equal chunks), so activations are O(C)
    and attention scores O(C x P) whatever the platform. Both equal one forward pass.
    """
    length = tokens.shape[1]
    if chunk < 0:
      raise ValueError(f'prefill chunk={chunk}: must be >= 0 (0 = the whole prompt in one call)')
    if cache.max_len and length > cache.max_len:
      raise ValueError(f'a prompt of {length} tokens is longer than the cache, built for {cache.max_len} '
                       '(init_cache max_len)')
    if not chunk or length <= chunk:
      return self(tokens, positions, cache, last_only=True)
    head = length % chunk
    if head:
      _, cache = self(tokens[:, :head], positions[:, :head], cache, last_only=True)

    def chunks(x: jax.Array) -> jax.Array:  # [B, P, ...] -> [P // C, B, C, ...] after the remainder
      x = x[:, head:]
      return jnp.moveaxis(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0)

    def one_chunk(cache: ModelCache, inputs: tuple[jax.Array, jax.Array]):
      logits, cache = self(*inputs, cache, last_only=True)
      return cache, logits

    cache, logits = jax.lax.scan(one_chunk, cache, (chunks(tokens), chunks(positions)))
    return logits[-1], cache

  def cache_bytes(self, batch: int, context_len: int, dtype: jnp.dtype = jnp.bfloat16) -> int:
    """Exact size of the decode cache for `context_len` tokens (no allocation)."""
    shapes = jax.eval_shape(lambda: self.init_cache(batch, context_len, dtype))
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes)))
