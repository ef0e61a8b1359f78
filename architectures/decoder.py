"""What the decoder families share: their common config fields and checks, and the generic stack.

`DecoderConfig` holds the fields every family has (sizes, dtypes, norm, logits,
attention kernel, scan and remat switches, forecasting inputs) with their
checks; a family adds its own fields and checks, and names in `unsupported`
the shared switches it cannot honour, so a config asking for one fails before
compiling with the family's reason.

`Decoder` is the one forward pass, decode cache and FLOP count of every family:

    x = embed(tokens)
    x = layer(x)                                 for each layer of the `stacks`
    shared = shared_keys(x)                      the shared-keys stage, if the family has `reader_stacks`
    x = layer(x, shared)                         for each layer of the `reader_stacks`
    logits = io.logits(final_norm(x))

each layer following the mixer protocol (layers/blocks/residual.py), so caches and
FLOPs come from the layers themselves. A family declares its parts: `io`,
`final_norm`, the attributes holding its layer stacks (layers/blocks/stack.py: a
list, scanned layers, or groups of a block pattern), and where it has one, the
shared-keys stage (`shared_keys`, `init_shared_cache`,
`shared_flops_per_token`, `reader_window`) and an `embed` of its own.
"""
import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from architectures.base import ModelCache, ModelConfig, SequenceModel
from layers.blocks import stack
from layers.blocks.layer_norm import LayerNorm
from layers.blocks.model_io import make_io
from layers.blocks.norms import RMSNorm
from layers.blocks.series_io import SeriesIO
from layers.blocks.shared_keys import SharedKeys
from layers.blocks.token_io import TokenIO
from layers.documents import Cursor, Segments, locate
from layers.flops import Lengths
from layers.kernels import attention_ops

# DecoderConfig.norm -> the family's norm (its blocks', the final one, YOCO's K/V and GoldFinch's embedding norm).
NORMS = {
    'rms': RMSNorm,                                                       # x rsqrt(mean(x^2) + eps) scale
    'rms_zero_centered': functools.partial(RMSNorm, zero_centered=True),  # x rsqrt(mean(x^2) + eps) (1 + scale)
    'layer': LayerNorm,                                                   # (x - mean) rsqrt(var + eps) scale + bias
}
# The key of the shared-keys stage's cache among the stacks' caches.
SHARED_KEYS = 'shared_keys'


@dataclasses.dataclass(frozen=True)
class DecoderConfig(ModelConfig):
  """Fields every family shares (`config.model.<name>`); a family redefines a default where its paper differs."""

  # field -> why the family cannot honour a value other than the default (refused before compiling).
  unsupported: ClassVar[dict[str, str]] = {}
  norm: ClassVar[str] = 'rms'   # NORMS: the family's norm

  vocab_size: int = 384
  num_layers: int = 2
  dim: int = 64
  mlp_dim: int = 256            # the feed-forward width (a family may give 0 a meaning)
  tie_embeddings: bool = False
  logits_soft_cap: float = 0.0  # 0: none; c > 0: c * tanh(logits / c)
  norm_eps: float = 1e-6
  attention_impl: str = 'auto'  # attention kernel: layers/kernels/attention_ops.IMPLEMENTATIONS
  dtype: str = 'bfloat16'       # compute
  param_dtype: str = 'float32'
  scan_layers: bool = False     # True: one lax.scan over alike layers (compile time flat in depth)
  remat: str = 'none'           # layers/blocks/stack.REMAT_POLICIES

  def __post_init__(self):
    family = type(self).__name__.removesuffix('Config')
    defaults = {f.name: f.default for f in dataclasses.fields(self)}
    for field, reason in self.unsupported.items():
      self.check(getattr(self, field) == defaults[field], field, f'{family} does not support it: {reason}')
    self.check_positive('vocab_size', 'num_layers', 'dim')
    self.check(self.mlp_dim >= 0, 'mlp_dim', 'must be >= 0')
    self.check(self.input_features >= 0, 'input_features', 'must be >= 0 (0 = tokens in, logits out)')
    self.check(self.logits_soft_cap >= 0, 'logits_soft_cap', 'must be >= 0 (0 = none)')
    self.check(self.norm_eps > 0, 'norm_eps', 'must be positive')
    self.check(self.attention_impl in attention_ops.IMPLEMENTATIONS, 'attention_impl',
               f'known: {attention_ops.IMPLEMENTATIONS}')
    self.check(self.remat in stack.REMAT_POLICIES, 'remat', f'known: {sorted(stack.REMAT_POLICIES)}')
    self.check_dtype('dtype')
    self.check_dtype('param_dtype')

  @property
  def dtypes(self) -> dict[str, jnp.dtype]:
    """The compute and parameter dtypes, as the layers take them."""
    return dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))

  @property
  def residual_init_scale(self) -> float:
    """Variance scale of the projections that write into the residual stream (GPT-2 style: 1 / (2 L))."""
    return 1.0 / (2 * self.num_layers)

  def make_norm(self, dim: int) -> nnx.Module:
    """The family's norm (`norm`) over `dim` channels, with `norm_eps`."""
    return NORMS[self.norm](dim, eps=self.norm_eps, param_dtype=self.dtypes['param_dtype'])

  def make_io(self, rngs: nnx.Rngs, **token_options) -> TokenIO | SeriesIO:
    """The model's ends: tokens in and logits out, or `input_features` values in and predictions out."""
    return make_io(self.vocab_size, self.dim, input_features=self.input_features,
                   tie_embeddings=self.tie_embeddings, logits_soft_cap=self.logits_soft_cap, rngs=rngs,
                   **self.dtypes, **token_options)


@dataclasses.dataclass(frozen=True)
class Call:
  """What a call gives the shared-keys stage besides the stacks' output."""
  inputs: jax.Array      # [B, T] int32 tokens ([B, T, F] values when forecasting)
  embedded: jax.Array    # [B, T, D]: embed(inputs), the first stack's input
  segments: Segments     # where the call's tokens sit
  cursor: Cursor | None  # where the rows stood before the call; None without a cache


class Decoder(SequenceModel):
  """embed -> stacks -> [shared keys -> reader stacks] -> final norm -> io.logits (the module docstring).

  A family sets `io`, `final_norm` and its stacks; the hooks below have the defaults of a plain stack."""

  config: DecoderConfig
  final_norm: nnx.Module
  # The model attributes holding the layer stacks, in order (a stack that is None or empty is skipped).
  stacks: ClassVar[tuple[str, ...]] = ('layers',)
  # The stacks after the shared-keys stage, whose layers read its SharedKeys (YOCO's cross-decoder, GoldFinch's
  # GOLD layers); the stage runs when one of them holds layers.
  reader_stacks: ClassVar[tuple[str, ...]] = ()

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: ModelCache | None = None, *,
               last_only: bool = False, capped: bool = True) -> tuple[jax.Array, ModelCache | None]:
    """tokens [B, T] int32 (values [B, T, F] when forecasting) -> logits [B, T or 1, V] (predictions [.., F]).

    With `last_only` the reader stacks run for the last `reader_window()` positions only (the early exit):
    the shared keys still cover every token, and the stacks before them write every token to the cache."""
    cursor = None if cache is None else cache.cursor
    segments, next_cursor = locate(positions, cursor)
    caches = None if cache is None else self.unpack_caches(cache.layers)
    new_caches = {}
    x = embedded = self.embed(tokens)                                            # [B, T, D]
    for name, layers in self.present(self.stacks):
      x, new_caches[name] = self.run_stack(layers, x, segments, None if caches is None else caches[name])
    readers = self.present(self.reader_stacks)
    if readers:
      call = Call(inputs=tokens, embedded=embedded, segments=segments, cursor=cursor)
      shared, new_caches[SHARED_KEYS] = self.shared_keys(x, call, None if caches is None else caches[SHARED_KEYS])
      window = min(x.shape[1], self.reader_window())
      if last_only and window < x.shape[1]:  # the early exit: only the positions the last output depends on
        x, segments, shared = x[:, -window:], segments.last(window), shared.seen_by_last_queries()
      for name, layers in readers:
        x, new_caches[name] = self.run_stack(layers, x, segments, None if caches is None else caches[name], shared)
    logits = self.io.logits(self.final_norm(x[:, -1:] if last_only else x), capped)
    if cache is None:
      return logits, None
    return logits, cache.replace(cursor=next_cursor, layers=self.pack_caches(new_caches))

  # -- the parts a family may declare ------------------------------------------------------------

  def embed(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] (values [B, T, F]) -> the first stack's input [B, T, D]."""
    return self.io.embed_tokens(tokens)

  def shared_keys(self, x: jax.Array, call: Call, cache: Any) -> tuple[SharedKeys, Any]:
    """The shared-keys stage: from the stacks' output x [B, T, D], the keys every reader layer reads (over
    the cached tokens and these), and the stage's cache with this call written (None without one)."""
    raise NotImplementedError(f'{type(self).__name__} has reader stacks but no shared_keys stage')

  def init_shared_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> Any:
    """The shared-keys stage's decode cache (fixed shapes)."""
    raise NotImplementedError(f'{type(self).__name__} has reader stacks but no shared-keys cache')

  def shared_flops_per_token(self) -> float:
    """Forward FLOPs per token of the shared-keys stage."""
    raise NotImplementedError(f'{type(self).__name__} has reader stacks but no shared-keys FLOPs')

  def reader_window(self) -> int:
    """How many last positions the reader stacks need for the last position's output (`last_only`): 1 where
    a reader layer mixes no positions but through the shared keys."""
    return 1

  # -- the generic machinery ---------------------------------------------------------------------

  def present(self, names: tuple[str, ...]) -> list[tuple[str, nnx.Module]]:
    """The stacks of `names` that hold layers, by name."""
    return [(name, getattr(self, name)) for name in names if stack.depth(getattr(self, name))]

  def run_stack(self, layers: nnx.Module, x: jax.Array, segments: Segments, caches: Any,
                shared: SharedKeys | None = None) -> tuple[jax.Array, Any]:
    """x [B, T, D] through every layer of a stack (one lax.scan when scanned; remat), their caches."""
    return stack.apply_layers(layers, x, caches, lambda layer, h, cache: layer(h, segments, cache, shared),
                              remat=self.config.remat)

  def pack_caches(self, caches: dict[str, Any]) -> Any:
    """The caches of the parts, by name -> ModelCache.layers: a family of one stack keeps its layers' caches
    (a list, or stacked), any other a dict by stack name (and SHARED_KEYS)."""
    return caches['layers'] if self.stacks == ('layers',) and not self.reader_stacks else caches

  def unpack_caches(self, layers: Any) -> dict[str, Any]:
    return {'layers': layers} if self.stacks == ('layers',) and not self.reader_stacks else layers

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype = jnp.bfloat16) -> ModelCache:
    caches = {name: stack.init_caches(layers, batch, max_len, dtype) for name, layers in self.present(self.stacks)}
    readers = self.present(self.reader_stacks)
    if readers:
      caches[SHARED_KEYS] = self.init_shared_cache(batch, max_len, dtype)
      caches.update((name, stack.init_caches(layers, batch, max_len, dtype)) for name, layers in readers)
    return ModelCache(cursor=Cursor.create(batch), layers=self.pack_caches(caches), max_len=max_len)

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    """Forward FLOPs per token: every layer's (attention within the documents of `doc_lengths`), the
    shared-keys stage's and the logits' matmul; norms, soft cap and the embedding lookup are not counted."""
    flops = 0.0
    for _, layers in self.present(self.stacks):
      flops += stack.flops_per_token(layers, seq_len, doc_lengths)
    readers = self.present(self.reader_stacks)
    if readers:
      flops += self.shared_flops_per_token()
    for _, layers in readers:
      flops += stack.flops_per_token(layers, seq_len, doc_lengths)
    return flops + self.io.flops_per_token()
