"""What the decoder families share: their common config fields and checks, and the generic stack.

`DecoderConfig` holds the fields every family has (sizes, dtypes, norm, logits,
attention kernel, scan and remat switches, forecasting inputs) with their
checks; a family adds its own fields and checks, and names in `unsupported`
the shared switches it cannot honour, so a config asking for one fails before
compiling with the family's reason.

`Decoder` is   x = embed(tokens);  x = layer(x) for each layer;  logits = io(RMSNorm(x)),
each layer following the mixer protocol (layers/residual.py), so caches and
FLOPs come from the layers themselves. A family is a mixer, its config and a
short wiring class; it overrides `embed` or `run_layers` where it differs.
"""
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from architectures.base import ModelCache, ModelConfig, SequenceModel
from layers import attention_ops, stack
from layers.documents import Cursor, Segments, locate
from layers.flops import Lengths
from layers.model_io import make_io
from layers.series_io import SeriesIO
from layers.token_io import TokenIO


@dataclasses.dataclass(frozen=True)
class DecoderConfig(ModelConfig):
  """Fields every family shares (`config.model.<name>`); a family redefines a default where its paper differs."""

  # field -> why the family cannot honour a value other than the default (refused before compiling).
  unsupported: ClassVar[dict[str, str]] = {}

  vocab_size: int = 384
  num_layers: int = 2
  dim: int = 64
  mlp_dim: int = 256            # the feed-forward width (a family may give 0 a meaning)
  tie_embeddings: bool = False
  logits_soft_cap: float = 0.0  # 0: none; c > 0: c * tanh(logits / c)
  norm_eps: float = 1e-6
  attention_impl: str = 'auto'  # attention kernel: layers/attention_ops.IMPLEMENTATIONS
  dtype: str = 'bfloat16'       # compute
  param_dtype: str = 'float32'
  scan_layers: bool = False     # True: one lax.scan over alike layers (compile time flat in depth)
  remat: str = 'none'           # layers/stack.REMAT_POLICIES

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

  def make_io(self, rngs: nnx.Rngs, **token_options) -> TokenIO | SeriesIO:
    """The model's ends: tokens in and logits out, or `input_features` values in and predictions out."""
    return make_io(self.vocab_size, self.dim, input_features=self.input_features,
                   tie_embeddings=self.tie_embeddings, logits_soft_cap=self.logits_soft_cap, rngs=rngs,
                   **self.dtypes, **token_options)


class Decoder(SequenceModel):
  """embed -> layers -> final norm -> io.logits; a family sets `io`, `layers` (stack.create_layers) and `final_norm`."""

  config: DecoderConfig
  layers: nnx.Module
  final_norm: nnx.Module

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: ModelCache | None = None, *,
               last_only: bool = False, capped: bool = True) -> tuple[jax.Array, ModelCache | None]:
    """tokens [B, T] int32 (values [B, T, F] when forecasting) -> logits [B, T or 1, V] (predictions [.., F])."""
    segments, cursor = locate(positions, None if cache is None else cache.cursor)
    x = self.embed(tokens)  # [B, T, D]
    x, layer_caches = self.run_layers(x, segments, None if cache is None else cache.layers, last_only=last_only)
    logits = self.io.logits(self.final_norm(x), capped)
    return logits, (None if cache is None else cache.replace(cursor=cursor, layers=layer_caches))

  def embed(self, tokens: jax.Array) -> jax.Array:
    return self.io.embed_tokens(tokens)

  def run_layers(self, x: jax.Array, segments: Segments, caches: Any, *,
                 last_only: bool = False) -> tuple[jax.Array, Any]:
    """x [B, T, D] through every layer -> [B, T, D] ([B, 1, D], the last position, with `last_only`: a family
    may then skip work the last position does not need); `caches` as init_cache built them (None: no cache)."""
    cfg = self.config
    x, caches = stack.apply_layers(self.layers, x, caches, lambda layer, h, cache: layer(h, segments, cache),
                                   scan=cfg.scan_layers, remat=cfg.remat)
    return (x[:, -1:] if last_only else x), caches

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype = jnp.bfloat16) -> ModelCache:
    cfg = self.config
    layers = stack.init_caches(self.layers, cfg.num_layers, batch, max_len, dtype, scan=cfg.scan_layers)
    return ModelCache(cursor=Cursor.create(batch), layers=layers, max_len=max_len)

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    cfg = self.config
    layers = stack.flops_per_token(self.layers, cfg.num_layers, seq_len, doc_lengths, scan=cfg.scan_layers)
    return layers + self.io.flops_per_token()
