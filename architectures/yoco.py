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

Both decoders stack layers/residual.ResidualBlock: the self-decoder's mixer is
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
last position is also run so that its logits start generation).
"""
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from architectures import registry
from architectures.base import ModelCache
from architectures.decoder import Decoder, DecoderConfig
from layers import attention_ops, sharding, stack
from layers.attention import Attention
from layers.documents import Cursor, Segments
from layers.flops import Lengths, attention_flops, document_lengths, mean_visible_keys
from layers.gated_retention import GatedRetention
from layers.kv_cache import KVCache, Keys
from layers.linear import Dense
from layers.mlp import GatedMLP
from layers.norms import RMSNorm
from layers.residual import Mixer, ResidualBlock
from layers.rope import FREQUENCIES, STYLES, apply_rope


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

  @property
  def residual_init_scale(self) -> float:
    """Variance scale of the projections that write into the residual stream."""
    return 1.0 / (2 * self.num_layers)


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


@dataclasses.dataclass(frozen=True)
class SharedKV:
  """The global keys and values (RoPE applied) a cross layer attends into."""
  keys: Keys     # [B, S, K, H] keys and values, each key's index and document [B, S]
  own_row: bool  # the keys are exactly the queries' tokens (training): the attention kernels serve


class CrossAttention(nnx.Module):
  """q = RoPE(x W_q); o = attention(q, the shared K, V) (causal, within the document); y = o W_o.

  A mixer (layers/residual.py) whose third argument is the shared K/V, given
  to every cross layer and returned unchanged: it has no decode state of its own.
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
    del batch, max_len, dtype  # the shared K/V is the model's (YOCO.init_cache)
    return None

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    """The q and out projections and attention over the keys each query sees."""
    projections = 2 * self.dim * 2 * self.num_heads * self.head_dim
    keys = mean_visible_keys(document_lengths(seq_len, doc_lengths))
    return projections + attention_flops(self.num_heads, self.head_dim, keys)

  def __call__(self, x: jax.Array, segments: Segments, kv: SharedKV) -> tuple[jax.Array, SharedKV]:
    """x [B, T, D] at `segments` -> y [B, T, D], and `kv` as it came."""
    heads = (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_HEADS, None)
    q = sharding.constrain(apply_rope(self.query(x), segments.positions, **self.rope), heads)  # [B, T, N, H]
    scale = self.head_dim ** -0.5
    keys = kv.keys
    if kv.own_row:
      o = attention_ops.self_attention(q, keys.keys, keys.values, segments.index, segments.document, None, scale,
                                       self.impl)
    else:
      o = attention_ops.attend_visible(q, keys.keys, keys.values, segments.index, segments.document, keys.index,
                                       keys.documents, None, scale)
    return self.out(sharding.constrain(o, heads)), kv


def block(cfg: YOCOConfig, mixer: Mixer, rngs: nnx.Rngs) -> ResidualBlock:
  """Pre-RMSNorm residual block: the mixer, then SwiGLU."""
  mlp = GatedMLP(cfg.dim, cfg.mlp_dim, activation='silu', out_init_scale=cfg.residual_init_scale, rngs=rngs,
                 **cfg.dtypes)
  return ResidualBlock(cfg.dim, mixer, mlp, norm_eps=cfg.norm_eps, param_dtype=cfg.dtypes['param_dtype'])


def cross_attention(cfg: YOCOConfig, rngs: nnx.Rngs) -> CrossAttention:
  return CrossAttention(cfg.dim, cfg.num_heads, cfg.head_dim, rope=cfg.rope, impl=cfg.attention_impl,
                        out_init_scale=cfg.residual_init_scale, rngs=rngs, **cfg.dtypes)


@flax.struct.dataclass
class YOCOLayerCaches:
  self_decoder: Any  # per self layer (stacked when scanned): the mixers' caches (RetentionCache or a window KVCache)
  cross_kv: KVCache  # the one global K/V every cross layer reads


@registry.register('yoco')
class YOCO(Decoder):
  """Self-decoder layers, the shared K/V, cross-decoder layers (the module docstring)."""
  Config = YOCOConfig

  def __init__(self, config: YOCOConfig, *, rngs: nnx.Rngs):
    self.config = cfg = config
    self.io = cfg.make_io(rngs, scale_embeddings=True, embed_init_std=cfg.dim ** -0.5)
    make_mixer = SELF_MIXERS[cfg.self_mixer]
    self.self_layers = stack.create_layers(lambda r: block(cfg, make_mixer(cfg, r), r), cfg.self_layers, rngs,
                                           scan=cfg.scan_layers)
    self.kv_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=cfg.dtypes['param_dtype'])
    kv_names = (sharding.EMBED, sharding.KV_HEADS, sharding.HEAD_DIM)
    self.key = Dense(cfg.dim, (cfg.kv_heads, cfg.head_dim), names=kv_names, rngs=rngs, **cfg.dtypes)
    self.value = Dense(cfg.dim, (cfg.kv_heads, cfg.head_dim), names=kv_names, rngs=rngs, **cfg.dtypes)
    self.cross_layers = stack.create_layers(lambda r: block(cfg, cross_attention(cfg, r), r), cfg.cross_layers,
                                            rngs, scan=cfg.scan_layers)
    self.final_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=cfg.dtypes['param_dtype'])

  def run_layers(self, x: jax.Array, segments: Segments, caches: YOCOLayerCaches | None, *,
                 last_only: bool = False) -> tuple[jax.Array, YOCOLayerCaches | None]:
    """x [B, T, D] -> [B, T (1 with last_only), D]: self-decoder, the shared K/V (cached), cross-decoder."""
    cfg = self.config
    x, self_caches = stack.apply_layers(self.self_layers, x, None if caches is None else caches.self_decoder,
                                        lambda layer, h, cache: layer(h, segments, cache),
                                        scan=cfg.scan_layers, remat=cfg.remat)
    kv, cross_kv = self.shared_kv(x, segments, None if caches is None else caches.cross_kv, own_row=not last_only)
    queries = segments
    if last_only:  # early exit: the cross-decoder runs for the last position only
      x, queries = x[:, -1:], segments.last()
    x, _ = stack.apply_layers(self.cross_layers, x, None, lambda layer, h, _: (layer(h, queries, kv)[0], None),
                              scan=cfg.scan_layers, remat=cfg.remat)
    return x, (None if caches is None else YOCOLayerCaches(self_decoder=self_caches, cross_kv=cross_kv))

  def shared_kv(self, x: jax.Array, segments: Segments, cache: KVCache | None, *,
                own_row: bool) -> tuple[SharedKV, KVCache | None]:
    """K = RoPE(RMSNorm(x) W_K), V = RMSNorm(x) W_V of the self-decoder's output x [B, T, D], written to `cache`."""
    kv_heads = (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_KV_HEADS, None)
    h = self.kv_norm(x)
    k = sharding.constrain(apply_rope(self.key(h), segments.positions, **self.config.rope), kv_heads)  # [B, T, K, H]
    v = sharding.constrain(self.value(h), kv_heads)                                                   # [B, T, K, H]
    if cache is None:
      return SharedKV(Keys(k, v, segments.index, segments.document), own_row=own_row), None
    visible, cache = cache.extend(k, v, segments.index, segments.document)
    return SharedKV(visible, own_row=False), cache

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype = jnp.bfloat16) -> ModelCache:
    cfg = self.config
    self_decoder = stack.init_caches(self.self_layers, cfg.self_layers, batch, max_len, dtype, scan=cfg.scan_layers)
    cross_kv = KVCache.create(batch, max_len, cfg.kv_heads, cfg.head_dim, dtype, keeps_all=True)
    return ModelCache(cursor=Cursor.create(batch), layers=YOCOLayerCaches(self_decoder=self_decoder, cross_kv=cross_kv),
                      max_len=max_len)

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    cfg = self.config
    self_decoder = stack.flops_per_token(self.self_layers, cfg.self_layers, seq_len, doc_lengths, scan=cfg.scan_layers)
    shared_kv = 2 * cfg.dim * 2 * cfg.kv_heads * cfg.head_dim
    cross_decoder = stack.flops_per_token(self.cross_layers, cfg.cross_layers, seq_len, doc_lengths,
                                          scan=cfg.scan_layers)
    return self_decoder + shared_kv + cross_decoder + self.io.flops_per_token()
