"""YOCO: You Only Cache Once (Sun et al. 2024, arXiv 2405.05254; docs/architectures.md, YOCO).

A decoder-decoder. The self-decoder (the first `num_self_layers` layers) mixes
with gated retention or sliding-window attention, whose decode caches are of
constant size. Its output, once RMSNorm-ed, is projected to ONE set of keys
and values (GQA, RoPE on the keys): the global cache. Every cross-decoder layer
has only a query and an output projection and attends causally (within the
document) into that shared K/V:

    x = E[token] * sqrt(D)
    x = x + Mixer_i(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))      i < L_self
    K, V = RoPE(RMSNorm(x) W_K), RMSNorm(x) W_V                   (computed once)
    x = x + CrossAttention_j(RMSNorm(x); K, V);  x = x + SwiGLU(RMSNorm(x))   j < L - L_self
    logits = RMSNorm(x) W_out                                     (untied by default)

Both decoders stack layers/blocks/residual.ResidualBlock: the self-decoder's mixer is
GatedRetention or sliding-window Attention, the cross-decoder's is
CrossAttention, whose third argument is the shared K/V instead of a cache of
its own. With `input_features > 0` the ends are the forecasting SeriesIO.

Decode cache = the self-decoder states + one global K/V. For a context of n
tokens, in bytes per batch row (b bytes per cached K/V element; each K/V slot
also keeps its int32 token index and document, 8 bytes; the cursor is 8 bytes):

    gated retention: L_self * N_self * d_self^2 * 4              (float32 states)
                     + n * (2 * K * d_head * b + 8) + 8
    sliding window:  L_self * min(W, n) * (2 * K_self * d_self * b + 8)
                     + n * (2 * K * d_head * b + 8) + 8

(d_self = D / N_self, d_head = D / N) against L * n * (2 * K * d_head * b + 8) + 8
for a Transformer of L layers with K K/V heads: about L times less at long context.

Prefill early exit: called with a cache and `last_only=True`, the self-decoder
runs over the prompt and writes the global K/V, and the cross-decoder runs for
the last position only (the paper's prefill that skips the cross-decoder; the
last position is also run so that its logits start generation): the generic
decoder's reader window (architectures/decoder.py), 1 here.
"""
import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from architectures import registry
from architectures.decoder import Decoder, DecoderConfig
from architectures.shared_stages import SharedKV
from layers import sharding
from layers.blocks import stack
from layers.blocks.linear import Dense
from layers.blocks.mlp import GatedMLP
from layers.blocks.residual import Mixer, ResidualBlock
from layers.blocks.rope import FREQUENCIES, STYLES, apply_rope
from layers.blocks.shared_keys import SharedKeys
from layers.documents import Segments
from layers.flops import Lengths, attention_flops, document_lengths, mean_visible_keys
from layers.kernels import attention_ops
from layers.mixers.attention import Attention
from layers.mixers.gated_retention import GatedRetention


@dataclasses.dataclass(frozen=True)
class YOCOConfig(DecoderConfig):
  norm_eps: float = 1e-5            # the reference's RMSNorm eps
  num_self_layers: int = 0          # 0: num_layers // 2 (the paper's split); the rest are cross layers
  num_heads: int = 4                # cross-decoder query heads
  num_kv_heads: int = 0             # heads of the global K/V: 0 = num_heads; 1 = MQA; else GQA
  self_mixer: str = 'gated_retention'  # or 'sliding_window'
  self_num_heads: int = 0           # self-decoder heads: 0 = num_heads
  self_num_kv_heads: int = 0        # sliding-window K/V heads: 0 = self_num_heads (MHA, as the reference)
  window: int = 1024                # sliding window (W keys, itself included); used by 'sliding_window'
  retention_chunk_size: int = 256   # tokens per chunk of the chunked gated-retention form
  gate_logit_normalizer: float = 16.0  # log gamma = logsigmoid(x W_gamma) / this
  rope_base: float = 10000.0
  rope_style: str = 'interleaved'
  rope_frequencies: str = 'linspace'  # the reference's 1 / base^linspace(0, 1, d/2); or 'standard'

  runtime_fields: ClassVar[tuple[str, ...]] = DecoderConfig.runtime_fields + ('retention_chunk_size',)

  def __post_init__(self):
    super().__post_init__()
    self.check_positive('num_heads', 'mlp_dim', 'retention_chunk_size')
    self.check(self.num_layers >= 2, 'num_layers', 'YOCO needs at least one self- and one cross-decoder layer')
    self.check(0 <= self.num_self_layers < self.num_layers, 'num_self_layers',
               f'must be in [0, config.model.num_layers={self.num_layers}) (0 = half)')
    self.check(self.dim % self.num_heads == 0, 'num_heads', f'does not divide config.model.dim={self.dim}')
    self.check(self.num_kv_heads >= 0 and self.num_heads % self.kv_heads == 0, 'num_kv_heads',
               f'must divide config.model.num_heads={self.num_heads}')
    self.check(self.self_num_heads >= 0 and self.dim % self.self_heads == 0, 'self_num_heads',
               f'does not divide config.model.dim={self.dim}')
    self.check(self.self_num_kv_heads >= 0 and self.self_heads % self.self_kv_heads == 0, 'self_num_kv_heads',
               f'must divide the self-decoder heads ({self.self_heads})')
    self.check(self.self_mixer in SELF_MIXERS, 'self_mixer', f'known: {tuple(SELF_MIXERS)}')
    self.check(self.self_mixer != 'sliding_window' or self.window > 0, 'window',
               "must be positive with config.model.self_mixer='sliding_window'")
    self.check(self.gate_logit_normalizer > 0, 'gate_logit_normalizer', 'must be positive')
    self.check(self.rope_style in STYLES, 'rope_style', f'known: {STYLES}')
    self.check(self.rope_frequencies in FREQUENCIES, 'rope_frequencies', f'known: {FREQUENCIES}')
    self.check(self.head_dim % 2 == 0 and self.self_head_dim % 2 == 0, 'dim',
               'head sizes (dim / heads) must be even for RoPE')

  @property
  def self_layers(self) -> int:
    return self.num_self_layers or self.num_layers // 2

  @property
  def cross_layers(self) -> int:
    return self.num_layers - self.self_layers

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def self_heads(self) -> int:
    return self.self_num_heads or self.num_heads

  @property
  def self_kv_heads(self) -> int:
    return self.self_num_kv_heads or self.self_heads

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def self_head_dim(self) -> int:
    return self.dim // self.self_heads

  @property
  def rope(self) -> FrozenDict:
    return FrozenDict(base=self.rope_base, style=self.rope_style, frequencies=self.rope_frequencies)


def gated_retention(cfg: YOCOConfig, rngs: nnx.Rngs) -> GatedRetention:
  return GatedRetention(cfg.dim, cfg.self_heads, cfg.self_head_dim, chunk_size=cfg.retention_chunk_size,
                        gate_logit_normalizer=cfg.gate_logit_normalizer, norm_eps=cfg.norm_eps,
                        rope_base=cfg.rope_base, rope_style=cfg.rope_style, rope_frequencies=cfg.rope_frequencies,
                        out_init_scale=cfg.residual_init_scale, rngs=rngs, **cfg.dtypes)


def sliding_window(cfg: YOCOConfig, rngs: nnx.Rngs) -> Attention:
  return Attention(cfg.dim, cfg.self_heads, cfg.self_kv_heads, cfg.self_head_dim, window=cfg.window,
                   rope_base=cfg.rope_base, rope_style=cfg.rope_style, rope_frequencies=cfg.rope_frequencies,
                   impl=cfg.attention_impl, out_init_scale=cfg.residual_init_scale, rngs=rngs, **cfg.dtypes)


# config.model.self_mixer -> the self-decoder's mixer.
SELF_MIXERS: dict[str, Callable[[YOCOConfig, nnx.Rngs], Mixer]] = {
    'gated_retention': gated_retention, 'sliding_window': sliding_window}


class CrossAttention(nnx.Module):
  """q = RoPE(x W_q); o = attention(q, the shared K, V) (causal, within the document); y = o W_o.

  A mixer (layers/blocks/residual.py) that reads the shared K/V, its fourth argument (SharedKeys whose payload is
  (k, v), RoPE applied), the same for every cross layer; it keeps no decode state of its own.
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, rope: FrozenDict, impl: str,
               out_init_scale: float = 1.0, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
    self.impl = impl
    self.rope = rope
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query = Dense(dim, (num_heads, head_dim), names=(sharding.EMBED, sharding.HEADS, sharding.HEAD_DIM),
                       **common)
    self.out = Dense((num_heads, head_dim), dim, names=(sharding.HEADS, sharding.HEAD_DIM, sharding.EMBED),
                     init_scale=out_init_scale, **common)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> None:
    del batch, max_len, dtype  # the shared K/V is the model's (YOCO.init_shared_cache)
    return None

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    """The q and out projections and attention over the keys each query sees."""
    projections = 2 * self.dim * 2 * self.num_heads * self.head_dim
    keys = mean_visible_keys(document_lengths(seq_len, doc_lengths))
    return projections + attention_flops(self.num_heads, self.head_dim, keys)

  def __call__(self, x: jax.Array, segments: Segments, cache: None,
               shared: SharedKeys) -> tuple[jax.Array, None]:
    """x [B, T, D] at `segments` -> y [B, T, D], attending into shared.payload = (k, v) [B, S, K, H]."""
    heads = (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_HEADS, None)
    q = sharding.constrain(apply_rope(self.query(x), segments.positions, **self.rope), heads)  # [B, T, N, H]
    o = attention_ops.attend(q, segments, shared.attended(*shared.payload), None, self.head_dim ** -0.5, self.impl)
    return self.out(sharding.constrain(o, heads)), cache


def block(cfg: YOCOConfig, mixer: Mixer, rngs: nnx.Rngs) -> ResidualBlock:
  """Pre-RMSNorm residual block: the mixer, then SwiGLU."""
  mlp = GatedMLP(cfg.dim, cfg.mlp_dim, activation='silu', out_init_scale=cfg.residual_init_scale, rngs=rngs,
                 **cfg.dtypes)
  return ResidualBlock(cfg.dim, mixer, mlp, norm=cfg.make_norm)


def cross_attention(cfg: YOCOConfig, rngs: nnx.Rngs) -> CrossAttention:
  return CrossAttention(cfg.dim, cfg.num_heads, cfg.head_dim, rope=cfg.rope, impl=cfg.attention_impl,
                        out_init_scale=cfg.residual_init_scale, rngs=rngs, **cfg.dtypes)


@registry.register('yoco')
class YOCO(SharedKV, Decoder):
  """The generic decoder: the self-decoder, the shared K/V (the shared-keys stage, architectures/shared_stages.py),
  the cross-decoder reading it (the module docstring)."""

  Config = YOCOConfig
  stacks = ('self_layers',)
  reader_stacks = ('cross_layers',)

  def __init__(self, config: YOCOConfig, *, rngs: nnx.Rngs):
    self.config = cfg = config
    self.io = cfg.make_io(rngs, scale_embeddings=True, embed_init_std=cfg.dim ** -0.5)
    make_mixer = SELF_MIXERS[cfg.self_mixer]
    self.self_layers = stack.create_layers(lambda r: block(cfg, make_mixer(cfg, r), r), cfg.self_layers, rngs,
                                           scan=cfg.scan_layers)
    self.build_shared_kv(cfg, cfg.kv_heads, cfg.head_dim, cfg.rope, rngs)
    self.cross_layers = stack.create_layers(lambda r: block(cfg, cross_attention(cfg, r), r), cfg.cross_layers,
                                            rngs, scan=cfg.scan_layers)
    self.final_norm = cfg.make_norm(cfg.dim)
