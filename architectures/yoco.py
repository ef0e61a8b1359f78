"""YOCO: You Only Cache Once (Sun et al. 2024, REFERENCES.md §4).

A decoder-decoder. The self-decoder (the first `num_self_layers` layers) mixes
with gated retention or sliding-window attention, whose decode caches are of
constant size. Its output, once RMSNorm-ed, is projected to ONE set of keys
and values (GQA, RoPE on the keys): the global cache. Every cross-decoder layer
has only a query and an output projection and attends causally (within the
document) into that shared K/V:

    x = E[token] * sqrt(D)
    x = SelfLayer_i(x)                     i < L_self   (pre-RMSNorm mixer + SwiGLU)
    K, V = RoPE(RMSNorm(x) W_K), RMSNorm(x) W_V          (computed once)
    x = CrossLayer_j(x; K, V)              j < L - L_self
    logits = RMSNorm(x) W_out              (untied)

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
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from architectures import registry
from architectures.base import ModelCache, ModelConfig, SequenceModel
from layers import attention_ops, sharding, stack
from layers.attention import Attention
from layers.documents import Cursor, Segments, locate
from layers.flops import mean_visible_keys
from layers.gated_retention import GatedRetention, RetentionCache
from layers.kv_cache import KVCache, Keys
from layers.linear import Dense
from layers.mlp import GatedMLP
from layers.norms import RMSNorm
from layers.rope import FREQUENCIES, STYLES, apply_rope
from layers.token_io import TokenIO

SELF_MIXERS = ('gated_retention', 'sliding_window')


@dataclasses.dataclass(frozen=True)
class YOCOConfig(ModelConfig):
  vocab_size: int = 384
  num_layers: int = 2
  num_self_layers: int = 0          # 0: num_layers // 2 (the paper's split); the rest are cross layers
  dim: int = 64
  num_heads: int = 4                # cross-decoder query heads
  num_kv_heads: int = 0             # heads of the global K/V: 0 = num_heads; 1 = MQA; else GQA
  self_mixer: str = 'gated_retention'  # or 'sliding_window'
  self_num_heads: int = 0           # self-decoder heads: 0 = num_heads
  self_num_kv_heads: int = 0        # sliding-window K/V heads: 0 = self_num_heads (MHA, as the reference)
  window: int = 1024                # sliding window (W keys, itself included); used by 'sliding_window'
  retention_chunk_size: int = 256   # tokens per chunk of the chunked gated-retention form
  gate_logit_normalizer: float = 16.0  # log gamma = logsigmoid(x W_gamma) / this
  mlp_dim: int = 256
  rope_base: float = 10000.0
  rope_style: str = 'interleaved'
  rope_frequencies: str = 'linspace'  # the reference's 1 / base^linspace(0, 1, d/2); or 'standard'
  tie_embeddings: bool = False
  norm_eps: float = 1e-5
  attention_impl: str = 'auto'
  dtype: str = 'bfloat16'
  param_dtype: str = 'float32'
  scan_layers: bool = False
  remat: str = 'none'

  runtime_fields: ClassVar[tuple[str, ...]] = ModelConfig.runtime_fields + ('retention_chunk_size',)

  def __post_init__(self):
    self.check_positive('vocab_size', 'num_layers', 'dim', 'num_heads', 'mlp_dim', 'retention_chunk_size')
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
    self.check(self.self_mixer in SELF_MIXERS, 'self_mixer', f'known: {SELF_MIXERS}')
    self.check(self.self_mixer != 'sliding_window' or self.window > 0, 'window',
               "must be positive with config.model.self_mixer='sliding_window'")
    self.check(self.gate_logit_normalizer > 0, 'gate_logit_normalizer', 'must be positive')
    self.check(self.rope_style in STYLES, 'rope_style', f'known: {STYLES}')
    self.check(self.rope_frequencies in FREQUENCIES, 'rope_frequencies', f'known: {FREQUENCIES}')
    self.check(self.attention_impl in attention_ops.IMPLEMENTATIONS, 'attention_impl',
               f'known: {attention_ops.IMPLEMENTATIONS}')
    self.check(self.remat in stack.REMAT_POLICIES, 'remat', f'known: {sorted(stack.REMAT_POLICIES)}')
    self.check_dtype('dtype')
    self.check_dtype('param_dtype')
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


@flax.struct.dataclass
class YOCOLayerCaches:
  self_decoder: Any  # per self layer (stacked when scanned): RetentionCache or a window KVCache
  cross_kv: KVCache  # the one global K/V every cross layer reads


def _dtypes(cfg: YOCOConfig) -> dict:
  return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class SelfLayer(nnx.Module):
  """Pre-norm residual block: gated retention or sliding-window attention, then SwiGLU."""

  def __init__(self, cfg: YOCOConfig, rngs: nnx.Rngs):
    dtypes = _dtypes(cfg)
    out_scale = 1.0 / (2 * cfg.num_layers)
    self.mixer_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])
    if cfg.self_mixer == 'gated_retention':
      self.mixer = GatedRetention(
          cfg.dim, cfg.self_heads, cfg.self_head_dim, chunk_size=cfg.retention_chunk_size,
          gate_logit_normalizer=cfg.gate_logit_normalizer, norm_eps=cfg.norm_eps, rope_base=cfg.rope_base,
          rope_style=cfg.rope_style, rope_frequencies=cfg.rope_frequencies, out_init_scale=out_scale,
          rngs=rngs, **dtypes)
    else:
      self.mixer = Attention(
          cfg.dim, cfg.self_heads, cfg.self_kv_heads, cfg.self_head_dim, window=cfg.window,
          rope_base=cfg.rope_base, rope_style=cfg.rope_style, rope_frequencies=cfg.rope_frequencies,
          impl=cfg.attention_impl, out_init_scale=out_scale, rngs=rngs, **dtypes)
    self.mlp_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])
    self.mlp = GatedMLP(cfg.dim, cfg.mlp_dim, activation='silu', out_init_scale=out_scale, rngs=rngs, **dtypes)

  def __call__(self, x, positions, token_index, documents, cache):
    h = self.mixer_norm(x)
    if isinstance(self.mixer, GatedRetention):
      mixed, cache = self.mixer(h, positions, cache)
    else:
      mixed, cache = self.mixer(h, Segments(positions, token_index, documents), cache)
    x = x + mixed
    x = x + self.mlp(self.mlp_norm(x))
    return sharding.constrain(x, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED)), cache


@dataclasses.dataclass(frozen=True)
class SharedKV:
  """The global keys/values (RoPE applied) and the queries' place, what a cross layer attends with."""
  keys: Keys               # [B, S, K, H] keys and values, each key's index and document [B, S]
  q_index: jax.Array       # [B, T] the queries' token index and document
  q_document: jax.Array
  own_row: bool            # the keys are exactly the queries' row (training): the attention kernels serve


class CrossAttention(nnx.Module):
  """Query and output projections only: attends into the shared K/V (causal, document-masked)."""

  def __init__(self, cfg: YOCOConfig, rngs: nnx.Rngs):
    dtypes = _dtypes(cfg)
    self.head_dim = cfg.head_dim
    self.impl = cfg.attention_impl
    self.rope = FrozenDict(base=cfg.rope_base, style=cfg.rope_style, frequencies=cfg.rope_frequencies)
    self.query = Dense(cfg.dim, (cfg.num_heads, cfg.head_dim),
                       names=(sharding.EMBED, sharding.HEADS, sharding.HEAD_DIM), rngs=rngs, **dtypes)
    self.out = Dense((cfg.num_heads, cfg.head_dim), cfg.dim, names=(sharding.HEADS, sharding.HEAD_DIM, sharding.EMBED),
                     init_scale=1.0 / (2 * cfg.num_layers), rngs=rngs, **dtypes)

  def __call__(self, x: jax.Array, positions: jax.Array, kv: SharedKV) -> jax.Array:
    heads = (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_HEADS, None)
    q = sharding.constrain(apply_rope(self.query(x), positions, **self.rope), heads)  # [B, T, N, H]
    scale = self.head_dim ** -0.5
    keys = kv.keys
    if kv.own_row:
      o = attention_ops.self_attention(q, keys.keys, keys.values, kv.q_index, kv.q_document, None, scale, self.impl)
    else:
      o = attention_ops.attend_visible(q, keys.keys, keys.values, kv.q_index, kv.q_document, keys.index,
                                       keys.documents, None, scale)
    return self.out(sharding.constrain(o, heads))


class CrossLayer(nnx.Module):
  """Pre-norm residual block: cross-attention into the shared K/V, then SwiGLU."""

  def __init__(self, cfg: YOCOConfig, rngs: nnx.Rngs):
    dtypes = _dtypes(cfg)
    self.mixer_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])
    self.mixer = CrossAttention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])
    self.mlp = GatedMLP(cfg.dim, cfg.mlp_dim, activation='silu', out_init_scale=1.0 / (2 * cfg.num_layers),
                        rngs=rngs, **dtypes)

  def __call__(self, x, positions, kv: SharedKV):
    x = x + self.mixer(self.mixer_norm(x), positions, kv)
    x = x + self.mlp(self.mlp_norm(x))
    return sharding.constrain(x, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED))


@registry.register('yoco')
class YOCO(SequenceModel):
  Config = YOCOConfig

  def __init__(self, config: YOCOConfig, *, rngs: nnx.Rngs):
    self.config = cfg = config
    dtypes = _dtypes(cfg)
    self.io = TokenIO(cfg.vocab_size, cfg.dim, tie_embeddings=cfg.tie_embeddings, scale_embeddings=True,
                      embed_init_std=cfg.dim ** -0.5, rngs=rngs, **dtypes)
    self.self_layers = stack.create_layers(lambda r: SelfLayer(cfg, r), cfg.self_layers, rngs, scan=cfg.scan_layers)
    self.kv_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])
    kv_names = (sharding.EMBED, sharding.KV_HEADS, sharding.HEAD_DIM)
    self.key = Dense(cfg.dim, (cfg.kv_heads, cfg.head_dim), names=kv_names, rngs=rngs, **dtypes)
    self.value = Dense(cfg.dim, (cfg.kv_heads, cfg.head_dim), names=kv_names, rngs=rngs, **dtypes)
    self.cross_layers = stack.create_layers(lambda r: CrossLayer(cfg, r), cfg.cross_layers, rngs,
                                            scan=cfg.scan_layers)
    self.final_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: ModelCache | None = None, *,
               last_only: bool = False, capped: bool = True) -> tuple[jax.Array, ModelCache | None]:
    cfg = self.config
    segments, cursor = locate(positions, None if cache is None else cache.cursor)
    token_index, documents = segments.index, segments.document
    x = self.io.embed_tokens(tokens)  # [B, T, D]

    def self_fn(layer: SelfLayer, h, layer_cache):
      return layer(h, positions, token_index, documents, layer_cache)

    x, self_caches = stack.apply_layers(self.self_layers, x, None if cache is None else cache.layers.self_decoder,
                                        self_fn, scan=cfg.scan_layers, remat=cfg.remat)
    kv, cross_kv = self._shared_kv(x, positions, token_index, documents, cache, last_only)
    if last_only:  # early exit: the cross-decoder runs for the last position only
      x, positions = x[:, -1:], positions[:, -1:]

    def cross_fn(layer: CrossLayer, h, _):
      return layer(h, positions, kv), None

    x, _ = stack.apply_layers(self.cross_layers, x, None, cross_fn, scan=cfg.scan_layers, remat=cfg.remat)
    logits = self.io.logits(self.final_norm(x), capped)  # [B, T or 1, V]
    if cache is None:
      return logits, None
    return logits, cache.replace(cursor=cursor, layers=YOCOLayerCaches(self_decoder=self_caches, cross_kv=cross_kv))

  def _shared_kv(self, x, positions, token_index, documents, cache, last_only):
    """The global K/V from the self-decoder output (written to the cache) and the cross layers' mask."""
    kv_heads = (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_KV_HEADS, None)
    h = self.kv_norm(x)
    rope = dict(base=self.config.rope_base, style=self.config.rope_style, frequencies=self.config.rope_frequencies)
    k = sharding.constrain(apply_rope(self.key(h), positions, **rope), kv_heads)  # [B, T, K, H]
    v = sharding.constrain(self.value(h), kv_heads)
    q_index, q_document = (token_index[:, -1:], documents[:, -1:]) if last_only else (token_index, documents)
    if cache is None:
      return SharedKV(Keys(k, v, token_index, documents), q_index, q_document, own_row=not last_only), None
    visible, written = cache.layers.cross_kv.extend(k, v, token_index, documents)
    return SharedKV(visible, q_index, q_document, own_row=False), written

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype = jnp.bfloat16) -> ModelCache:
    cfg = self.config
    if cfg.self_mixer == 'gated_retention':
      one = RetentionCache.create(batch, cfg.self_heads, cfg.self_head_dim)  # float32 whatever `dtype`
    else:
      one = KVCache.create(batch, min(cfg.window, max_len), cfg.self_kv_heads, cfg.self_head_dim, dtype)
    self_caches = stack.stack_caches(one, cfg.self_layers) if cfg.scan_layers else [one] * cfg.self_layers
    cross_kv = KVCache.create(batch, max_len, cfg.kv_heads, cfg.head_dim, dtype)
    return ModelCache(cursor=Cursor.create(batch),
                      layers=YOCOLayerCaches(self_decoder=self_caches, cross_kv=cross_kv), max_len=max_len)

  def flops_per_token(self, seq_len: int) -> float:
    cfg = self.config
    d, m = cfg.dim, cfg.mlp_dim
    mlp = 2 * 3 * d * m
    n_s, h_s = cfg.self_heads, cfg.self_head_dim
    if cfg.self_mixer == 'gated_retention':
      chunk = min(cfg.retention_chunk_size, seq_len)
      # q, k, v, g, out projections + the decay gate; inside a chunk QK^T and AV; q S and k^T v per token.
      mixer = 2 * d * 5 * n_s * h_s + 2 * d * n_s + 2 * 2 * n_s * h_s * mean_visible_keys(chunk, 0) \
          + 2 * 2 * n_s * h_s * h_s
    else:
      k_s = cfg.self_kv_heads
      mixer = 2 * d * (2 * n_s * h_s + 2 * k_s * h_s) + 2 * 2 * n_s * h_s * mean_visible_keys(seq_len, cfg.window)
    n, k, h = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    shared_kv = 2 * d * 2 * k * h
    cross = 2 * d * 2 * n * h + 2 * 2 * n * h * mean_visible_keys(seq_len, 0)
    return (cfg.self_layers * (mixer + mlp) + shared_kv + cfg.cross_layers * (cross + mlp)
            + 2 * d * cfg.vocab_size)
