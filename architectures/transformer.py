"""Decoder-only Transformer baseline, with global or sliding-window attention.

Pre-norm blocks (Llama / Mistral shape):
    h = x + Attention(RMSNorm(x));  out = h + GatedMLP(RMSNorm(h))
then a final RMSNorm and the logits (tied to the embedding or a separate head).
`window > 0` makes every layer sliding-window attention over W keys, with a
ring-buffer decode cache of W slots (REFERENCES.md §1).
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from architectures import registry
from architectures.base import (DECODE_GEMV_OPTIONS, AttentionHeads, ModelCache, ModelConfig, SequenceModel,
                                mean_visible_keys, stack_layer_caches)
from layers import attention_ops, sharding, stack
from layers.attention import Attention
from layers.documents import Cursor, locate
from layers.mlp import ACTIVATIONS, GatedMLP
from layers.model_io import make_io
from layers.norms import RMSNorm
from layers.rope import STYLES, rotary_dims


@dataclasses.dataclass(frozen=True)
class TransformerConfig(AttentionHeads, ModelConfig):
  vocab_size: int = 384
  num_layers: int = 2
  dim: int = 64
  num_heads: int = 4
  num_kv_heads: int = 0        # 0: = num_heads (MHA); 1: MQA; else GQA
  head_dim: int = 0            # 0: = dim // num_heads
  mlp_dim: int = 256
  mlp_activation: str = 'silu'
  window: int = 0              # 0: global causal attention; W > 0: sliding window of W keys
  rope_base: float = 10000.0
  rope_style: str = 'standard'
  rope_fraction: float = 1.0
  tie_embeddings: bool = False
  logits_soft_cap: float = 0.0  # 0: none; c > 0: c * tanh(logits / c)
  norm_eps: float = 1e-6
  attention_impl: str = 'auto'
  dtype: str = 'bfloat16'
  param_dtype: str = 'float32'
  scan_layers: bool = False     # True: one lax.scan over layers (compile time flat in depth)
  remat: str = 'none'

  def __post_init__(self):
    self.check_positive('vocab_size', 'num_layers', 'dim', 'num_heads', 'mlp_dim')
    self.check_heads()
    self.check(self.window >= 0, 'window', 'must be >= 0 (0 = global attention)')
    self.check(self.logits_soft_cap >= 0, 'logits_soft_cap', 'must be >= 0 (0 = none)')
    self.check(self.mlp_activation in ACTIVATIONS, 'mlp_activation', f'known: {sorted(ACTIVATIONS)}')
    self.check(self.rope_style in STYLES, 'rope_style', f'known: {STYLES}')
    self.check(self.attention_impl in attention_ops.IMPLEMENTATIONS, 'attention_impl',
               f'known: {attention_ops.IMPLEMENTATIONS}')
    self.check(self.remat in stack.REMAT_POLICIES, 'remat', f'known: {sorted(stack.REMAT_POLICIES)}')
    self.check_dtype('dtype')
    self.check_dtype('param_dtype')
    try:
      rotary_dims(self.heads_dim, self.rope_fraction)
    except ValueError as e:
      self.check(False, 'rope_fraction', str(e))


class Block(nnx.Module):
  """One pre-norm residual block: a sequence mixer (attention by default) then a gated MLP."""

  def __init__(self, cfg: TransformerConfig, mixer: nnx.Module, rngs: nnx.Rngs):
    dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.mixer_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])
    self.mixer = mixer
    self.mlp_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])
    self.mlp = GatedMLP(cfg.dim, cfg.mlp_dim, activation=cfg.mlp_activation,
                        out_init_scale=residual_init_scale(cfg), rngs=rngs, **dtypes)

  def __call__(self, x, positions, token_index, documents, cache):
    """x [B, T, D] -> [B, T, D], the mixer's updated cache."""
    mixed, cache = self.mixer(self.mixer_norm(x), positions, token_index, documents, cache)
    x = x + mixed
    x = x + self.mlp(self.mlp_norm(x))
    return sharding.constrain(x, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED)), cache


def residual_init_scale(cfg: TransformerConfig) -> float:
  """Variance scale of the projections that write into the residual stream (GPT-2 style)."""
  return 1.0 / (2 * cfg.num_layers)


@registry.register('transformer')
class Transformer(SequenceModel):
  Config = TransformerConfig
  decode_compiler_options = DECODE_GEMV_OPTIONS

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    cfg = config
    dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.io = make_io(cfg.vocab_size, cfg.dim, input_features=cfg.input_features, tie_embeddings=cfg.tie_embeddings,
                      logits_soft_cap=cfg.logits_soft_cap, rngs=rngs, **dtypes)
    self.layers = stack.create_layers(lambda r: Block(cfg, self.make_mixer(cfg, r), r), cfg.num_layers, rngs,
                                      scan=cfg.scan_layers)
    self.final_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: ModelCache | None = None, *,
               last_only: bool = False, capped: bool = True) -> tuple[jax.Array, ModelCache | None]:
    """tokens [B, T] int32 (or values [B, T, F] when forecasting) -> logits [B, T, V] (predictions [B, T, F])."""
    cfg = self.config
    token_index, documents, cursor = locate(positions, None if cache is None else cache.cursor)
    x = self.io.embed_tokens(tokens)  # [B, T, D]

    def layer_fn(block: Block, h, layer_cache):
      return block(h, positions, token_index, documents, layer_cache)

    x, layer_caches = stack.apply_layers(self.layers, x, None if cache is None else cache.layers, layer_fn,
                                         scan=cfg.scan_layers, remat=cfg.remat)
    if last_only:
      x = x[:, -1:]
    logits = self.io.logits(self.final_norm(x), capped)  # [B, T or 1, V]
    return logits, (None if cache is None else cache.replace(cursor=cursor, layers=layer_caches))

  @staticmethod
  def make_mixer(cfg: TransformerConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The block's sequence mixer: causal (optionally sliding-window) attention."""
    return Attention(cfg.dim, cfg.num_heads, cfg.kv_heads, cfg.heads_dim, window=cfg.window or None,
                     rope_base=cfg.rope_base, rope_style=cfg.rope_style, rope_fraction=cfg.rope_fraction,
                     impl=cfg.attention_impl, out_init_scale=residual_init_scale(cfg), rngs=rngs,
                     dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype = jnp.bfloat16) -> ModelCache:
    cfg = self.config
    mixer = (self.layers if cfg.scan_layers else self.layers[0]).mixer  # shapes only: any layer will do
    one = mixer.init_cache(batch, max_len, dtype)
    layers = stack_layer_caches(one, cfg.num_layers) if cfg.scan_layers else [one] * cfg.num_layers
    return ModelCache(cursor=Cursor.create(batch), layers=layers, max_len=max_len)

  def mixer_flops_per_token(self, seq_len: int) -> float:
    """Forward matmul FLOPs per token of one layer's mixer: projections and attention."""
    cfg = self.config
    n, k, h = cfg.num_heads, cfg.kv_heads, cfg.heads_dim
    return 2 * cfg.dim * (2 * n * h + 2 * k * h) + 2 * 2 * n * h * mean_visible_keys(seq_len, cfg.window)

  def flops_per_token(self, seq_len: int) -> float:
    cfg = self.config
    mlp = 2 * 3 * cfg.dim * cfg.mlp_dim
    outputs = cfg.input_features or cfg.vocab_size
    return cfg.num_layers * (self.mixer_flops_per_token(seq_len) + mlp) + 2 * cfg.dim * outputs
