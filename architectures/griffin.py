"""Griffin and Hawk (De et al. 2024, arXiv 2402.19427; RecurrentGemma).

Residual blocks (pre-norm, zero-centred RMSNorm; layers/blocks/residual.ResidualBlock):
    r = x + Mixer(RMSNorm(x));  out = r + GeGLU-MLP(RMSNorm(r))
where the mixer of each layer follows `block_pattern`, cycled over the layers:
  'r'  recurrent block: y = gelu(W_y x); u = RG-LRU(Conv1D(W_x x)) (eqs. 1-4); out = W_out(u * y)
  'a'  local MQA attention (one K/V head, RoPE on half of each head's dims,
       sliding window of `window` keys including itself, output bias)
Griffin is 'rra' (two recurrent blocks, then attention); Hawk is 'r'. Then a
final RMSNorm and logits tied to the embedding, soft-capped at `logits_soft_cap`.
Token embeddings are scaled by sqrt(D) rounded to bf16 on input only (as RecurrentGemma;
TokenIO, built by cfg.make_io; a forecasting model's SeriesIO has no such scale).
Init (docs/architectures.md, Griffin): dense layers fan-in normal (truncated, as all of
layers/blocks/linear.py) with variance scale 2 / num_layers for each block's last
projection (W_out, attention out, MLP down), conv kernel 0.01 / width,
embedding std 1/sqrt(D), RG-LRU a uniform on the ring [0.9, 0.999].

Layers are built in groups of len(block_pattern) (layers/blocks/stack.create_groups:
each group the same shape), so `scan_layers` can run the groups with one
lax.scan; the layers that do not fill a whole group form the `tail`. Decode cache per layer: RG-LRU state
(float32) + the conv's last inputs for a recurrent block, a ring buffer of
`window` slots for attention. Parity with recurrentgemma 1.0.1 (whose window w
lets a query see w + 1 keys: ours is window = w + 1) is tested in
tests/test_griffin.py; `architectures.griffin_convert` ports its weights.
"""
import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from architectures import registry
from architectures.base import DECODE_GEMV_OPTIONS
from architectures.decoder import Decoder, DecoderConfig
from layers import sharding
from layers.blocks import stack
from layers.blocks.conv1d import CausalConv1D, ConvState
from layers.blocks.linear import Dense
from layers.blocks.mlp import GatedMLP
from layers.blocks.residual import Mixer, ResidualBlock
from layers.documents import Segments
from layers.flops import Lengths
from layers.mixers.attention import Attention
from layers.mixers.rg_lru import IMPLEMENTATIONS as LRU_IMPLEMENTATIONS
from layers.mixers.rg_lru import RGLRU

RECURRENT, ATTENTION = 'r', 'a'


@dataclasses.dataclass(frozen=True)
class GriffinConfig(DecoderConfig):
  runtime_fields: ClassVar[tuple[str, ...]] = (*DecoderConfig.runtime_fields, 'lru_impl', 'lru_chunk_size')
  norm: ClassVar[str] = 'rms_zero_centered'  # x rsqrt(mean(x^2) + eps) (1 + scale), scale initialised to 0

  num_layers: int = 3
  num_heads: int = 4            # attention heads (head_dim = dim / num_heads) and RG-LRU gate blocks
  lru_width: int = 0            # 0: = dim
  mlp_dim: int = 0              # 0: = 3 * dim
  block_pattern: str = 'rra'    # cycled over the layers: r = recurrent, a = local attention; Hawk: 'r'
  window: int = 2049            # keys a query sees, itself included (recurrentgemma's 2048 + 1); 0: global
  conv_width: int = 4
  lru_c: float = 8.0
  lru_min_rad: float = 0.9
  lru_max_rad: float = 0.999
  lru_impl: str = 'auto'        # 'fused' (GPU kernels) | 'sequential' | 'associative' | 'pallas' | 'auto'
  lru_chunk_size: int = 128
  rope_base: float = 10000.0
  rope_fraction: float = 0.5    # RecurrentGemma rotates the first half of each head's dims
  tie_embeddings: bool = True
  scale_embeddings: bool = True  # x = E[token] * sqrt(D) (False in the paper's 7B models; not when forecasting)
  round_embed_scale: bool = True  # sqrt(D) rounded to bfloat16 whatever the compute dtype (RecurrentGemma)
  logits_soft_cap: float = 30.0  # 0: none

  def __post_init__(self):
    super().__post_init__()
    self.check_positive('num_heads', 'conv_width', 'lru_chunk_size')
    for field in ('lru_width', 'window'):
      self.check(getattr(self, field) >= 0, field, 'must be >= 0 (0 = the default)')
    self.check(self.dim % self.num_heads == 0, 'num_heads', f'does not divide config.model.dim={self.dim}')
    self.check(self.lru % self.num_heads == 0, 'num_heads',
               f'does not divide config.model.lru_width={self.lru} (the RG-LRU gates have num_heads blocks)')
    self.check(bool(self.block_pattern) and set(self.block_pattern) <= {RECURRENT, ATTENTION}, 'block_pattern',
               "must be a non-empty string of 'r' (recurrent) and 'a' (attention), e.g. 'rra' (Griffin), 'r' (Hawk)")
    self.check(self.lru_c > 0, 'lru_c', 'must be positive')
    self.check(0 < self.lru_min_rad < 1, 'lru_min_rad', 'must be in (0, 1)')
    self.check(self.lru_min_rad < self.lru_max_rad < 1, 'lru_max_rad',
               f'must be in (config.model.lru_min_rad={self.lru_min_rad}, 1)')
    self.check(self.lru_impl in LRU_IMPLEMENTATIONS, 'lru_impl', f'known: {LRU_IMPLEMENTATIONS}')
    rotated = int(self.head_dim * self.rope_fraction)
    self.check(rotated > 0 and rotated % 2 == 0, 'rope_fraction',
               f'gives {rotated} rotated channels of head_dim {self.head_dim}; must be even and > 0')

  @property
  def lru(self) -> int:
    return self.lru_width or self.dim

  @property
  def mlp(self) -> int:
    return self.mlp_dim or 3 * self.dim

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def block_types(self) -> str:
    """The mixer of every layer, e.g. 'rrarrarr' for 8 Griffin layers."""
    pattern = self.block_pattern
    return (pattern * (self.num_layers // len(pattern) + 1))[:self.num_layers]

  @property
  def residual_init_scale(self) -> float:
    """Variance scale of each block's last projection (W_out, attention out, MLP down): 2 / L (RecurrentGemma)."""
    return 2.0 / self.num_layers


@flax.struct.dataclass
class RecurrentCache:
  lru: jax.Array     # [B, lru] float32: RG-LRU state
  conv: ConvState    # the conv's last conv_width - 1 inputs and their documents


class RecurrentBlock(nnx.Module):
  """Griffin's recurrent mixer: W_out(RG-LRU(Conv1D(W_x x)) * gelu(W_y x)), RG-LRU eqs. 1-4; dense layers with bias.

  W_x and W_y are one [D, 2, lru] kernel (`linear_in`): one matmul, and fewer parameter leaves.
  """

  def __init__(self, dim: int, width: int, num_heads: int, *, conv_width: int = 4, lru_c: float = 8.0,
               lru_min_rad: float = 0.9, lru_max_rad: float = 0.999, lru_impl: str = 'auto',
               lru_chunk_size: int = 128, out_init_scale: float = 1.0, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.dim, self.width, self.num_heads = dim, width, num_heads
    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    common = dict(use_bias=True, rngs=rngs, **dtypes)
    self.linear_in = Dense(dim, (2, width), names=(sharding.EMBED, None, sharding.LRU), **common)  # [x, y]
    self.linear_out = Dense(width, dim, names=(sharding.LRU, sharding.EMBED), init_scale=out_init_scale, **common)
    self.conv = CausalConv1D(width, conv_width, rngs=rngs, **dtypes)
    self.lru = RGLRU(width, num_heads, c=lru_c, min_rad=lru_min_rad, max_rad=lru_max_rad, impl=lru_impl,
                     chunk_size=lru_chunk_size, rngs=rngs, **dtypes)

  def __call__(self, x: jax.Array, segments: Segments,
               cache: RecurrentCache | None = None) -> tuple[jax.Array, RecurrentCache | None]:
    """x [B, T, D] -> [B, T, D], updated cache."""
    branches = self.linear_in(x)  # [B, T, 2, lru]
    y = jax.nn.gelu(branches[..., 1, :], approximate=True)  # [B, T, lru]
    u, conv_state = self.conv(branches[..., 0, :], segments.document, None if cache is None else cache.conv)
    u, lru_state = self.lru(u, segments.positions, None if cache is None else cache.lru)  # [B, T, lru]
    out = self.linear_out(u * y)
    return out, (None if cache is None else RecurrentCache(lru=lru_state, conv=conv_state))

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> RecurrentCache:
    """The RG-LRU state (float32) and the conv's last inputs: the same size whatever max_len."""
    del max_len
    return RecurrentCache(lru=self.lru.init_state(batch), conv=self.conv.init_state(batch, dtype))

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    """2 x every matmul weight (W_x, W_y, W_out), the block-diagonal RG-LRU gates as the matmuls they are
    (2 x 2 x lru x lru / num_heads), the conv's multiply-adds (2 x conv_width x lru) and the recurrence's
    multiply-add (2 x lru); sigmoid/softplus/exp/sqrt and GELU are not counted. Independent of the length."""
    del seq_len, doc_lengths
    d, w = self.dim, self.width
    return 2 * 3 * d * w + 2 * 2 * w * (w // self.num_heads) + 2 * self.conv.width * w + 2 * w


@registry.register('griffin')
class Griffin(Decoder):
  """The generic decoder over the groups of the block pattern, then the tail."""

  Config = GriffinConfig
  decode_compiler_options = DECODE_GEMV_OPTIONS
  stacks = ('groups', 'tail')

  def __init__(self, config: GriffinConfig, *, rngs: nnx.Rngs):
    self.config = cfg = config
    bf16_scale = jnp.bfloat16 if cfg.round_embed_scale else None
    self.io = cfg.make_io(rngs, scale_embeddings=cfg.scale_embeddings, round_scale_to=bf16_scale,
                          embed_init_std=cfg.dim ** -0.5)
    self.groups, self.tail = stack.create_groups(lambda kind, _, r: self.make_block(cfg, kind, r), cfg.block_pattern,
                                                 cfg.num_layers, rngs, scan=cfg.scan_layers)
    self.final_norm = cfg.make_norm(cfg.dim)

  @classmethod
  def make_block(cls, cfg: GriffinConfig, kind: str, rngs: nnx.Rngs) -> ResidualBlock:
    mlp = GatedMLP(cfg.dim, cfg.mlp, activation='gelu', use_bias=True, out_init_scale=cfg.residual_init_scale,
                   rngs=rngs, **cfg.dtypes)
    return ResidualBlock(cfg.dim, cls.make_mixer(cfg, kind, rngs), mlp, norm=cfg.make_norm)

  @staticmethod
  def make_mixer(cfg: GriffinConfig, kind: str, rngs: nnx.Rngs) -> Mixer:
    """The mixer of a layer of kind 'r' (recurrent block) or 'a' (local MQA attention)."""
    if kind == RECURRENT:
      return RecurrentBlock(cfg.dim, cfg.lru, cfg.num_heads, conv_width=cfg.conv_width, lru_c=cfg.lru_c,
                            lru_min_rad=cfg.lru_min_rad, lru_max_rad=cfg.lru_max_rad, lru_impl=cfg.lru_impl,
                            lru_chunk_size=cfg.lru_chunk_size, out_init_scale=cfg.residual_init_scale, rngs=rngs,
                            **cfg.dtypes)
    return Attention(cfg.dim, cfg.num_heads, 1, cfg.head_dim, window=cfg.window or None, rope_base=cfg.rope_base,
                     rope_fraction=cfg.rope_fraction, impl=cfg.attention_impl, out_init_scale=cfg.residual_init_scale,
                     out_bias=True, rngs=rngs, **cfg.dtypes)
