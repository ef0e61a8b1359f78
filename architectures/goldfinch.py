"""GoldFinch (Goldstein et al. 2024, arXiv 2407.12077) and Finch (RWKV-6), REFERENCES.md §5.

Pre-norm residual blocks with LayerNorms (the RWKV layout):

    x = LN0(E[token]);  x0 = x                        (x0: the normalised token embedding)
    x = x + TimeMix(LN1(x));  x = x + ChannelMix(LN2(x))          layers 0 .. F-1 (RWKV-6)
    c = x W_down                                      (D -> D / 16, once, after the last RWKV layer)
    x = x + GoldAttention(LN1(x); c, x0);  x = x + ChannelMix(LN2(x))   layers F .. L-1 (GOLD)
    logits = LN_out(x) W_out

F = int(2L / 3) by default (`gold_layers=-1`; the reference's inv_other_layer_ratio 3); the
RWKV layers are Finch-C2 (`time_mix='finch_c2'`) in GoldFinch. `gold_layers=0` makes the
whole stack RWKV: with `time_mix='finch'` that is Finch (RWKV-6, the paper's baseline),
with 'finch_c2' the Finch-C2 ablation. Layers live in layers/rwkv6.py, layers/wkv.py,
layers/token_shift.py and layers/gold_attention.py.

Decode cache, per batch row, for a context of n tokens (b bytes per element of the
cache dtype; H = head size, N = D / H heads, F RWKV and G GOLD layers):

    cursor                                 8
    each RWKV layer: wkv state             N H^2 * 4          (float32)
                     two token shifts      2 (D b + 4)        (last input + its document)
    each GOLD layer: two token shifts      2 (D b + 4)
    GOLD key cache (if G > 0):             n (4 + (D / 16) b) + 4   (token id + c_t per token,
                                                                     + the row's position offset)

so the part that grows with the context is 1 + D/16 numbers per token, whatever the
depth (a Transformer of the same shape keeps 2 D numbers per token and layer, plus
8 bytes of slot bookkeeping: L (2 D b + 8) bytes). Finch's cache does not grow at all.

Prefill early exit: called with a cache and `last_only=True`, the RWKV layers run over
the prompt (their states and c for every token are what the cache needs) and the GOLD
layers run only for the last min(T, 2G + 1) positions, all cached and new keys visible
(the token shifts in a GOLD block's time-mix and channel-mix reach one position back
each, so the last output and the shift states are exact from 2G + 1 positions on).
The stored cache holds no key or value: each call rebuilds keys from (token, c) once
and each GOLD layer derives its own k, v from them (compute traded for memory, as the
paper does).
"""
import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from architectures import registry
from architectures.base import ModelCache, ModelConfig, SequenceModel
from layers import attention_ops, sharding, stack
from layers.conv1d import ConvState
from layers.documents import Cursor, locate
from layers.flops import mean_visible_keys
from layers.gold_attention import GoldAttention, GoldKeyCache, KeyCompression, rms, shared_kv
from layers.layer_norm import LayerNorm
from layers.pallas_wkv import supports as fused_wkv_supports
from layers.rwkv6 import VARIANTS, ChannelMix, TimeMix, TimeMixCache
from layers.token_io import TokenIO
from layers.wkv import IMPLEMENTATIONS as WKV_IMPLEMENTATIONS


@dataclasses.dataclass(frozen=True)
class GoldFinchConfig(ModelConfig):
  runtime_fields: ClassVar[tuple[str, ...]] = ('dtype', 'attention_impl', 'remat', 'wkv_impl', 'wkv_chunk_size')

  vocab_size: int = 384
  num_layers: int = 3
  dim: int = 64
  head_dim: int = 64             # RWKV and GOLD heads: num_heads = dim / head_dim
  mlp_dim: int = 0               # channel-mix width; 0: int(3.5 D) // 32 * 32 (the reference's dim_ffn)
  time_mix: str = 'finch_c2'     # RWKV layers: 'finch_c2' (GoldFinch) or 'finch' (RWKV-6)
  gold_layers: int = -1          # -1: L - int(2L / 3) (the paper's split); 0: none (Finch)
  key_compression: int = 16      # D -> D / key_compression for the cached keys
  mix_lora_rank: int = 32        # ddlerp LoRAs (RWKV time-mix and GOLD q / k / v mixes)
  decay_lora_rank: int = 64      # decay LoRA (and Finch-C2's second value)
  gold_lora_rank: int = 0        # GOLD key and value LoRAs; 0: max(D / 16, 64)
  gold_rope: bool = False        # RoPE on GOLD queries and keys (off in the paper)
  rope_base: float = 10000.0
  wkv_impl: str = 'auto'         # 'fused' (Pallas Triton kernels; what 'auto' picks on GPU), 'chunked' (matmuls
                                 # inside chunks, XLA; 'auto' elsewhere) or 'recurrent' (lax.scan, the reference)
  wkv_chunk_size: int = 64
  tie_embeddings: bool = False
  norm_eps: float = 1e-5
  attention_impl: str = 'auto'
  dtype: str = 'bfloat16'
  param_dtype: str = 'float32'
  remat: str = 'none'

  def __post_init__(self):
    self.check_positive('vocab_size', 'num_layers', 'dim', 'head_dim', 'key_compression', 'mix_lora_rank',
                        'decay_lora_rank', 'wkv_chunk_size')
    self.check(self.dim % self.head_dim == 0, 'head_dim', f'does not divide config.model.dim={self.dim}')
    self.check(self.mlp_dim >= 0, 'mlp_dim', 'must be >= 0 (0 = 3.5 x dim)')
    self.check(self.gold_lora_rank >= 0, 'gold_lora_rank', 'must be >= 0 (0 = max(dim / 16, 64))')
    self.check(self.time_mix in VARIANTS, 'time_mix', f'known: {VARIANTS}')
    self.check(-1 <= self.gold_layers < self.num_layers, 'gold_layers',
               f'must be in [-1, config.model.num_layers={self.num_layers}) (-1: the paper\'s third; 0: Finch); '
               'the compressed keys come from an RWKV layer')
    self.check(self.num_gold_layers < self.num_layers, 'num_layers', 'GoldFinch needs at least one RWKV layer')
    self.check(self.num_gold_layers == 0 or self.dim % self.key_compression == 0, 'key_compression',
               f'does not divide config.model.dim={self.dim}')
    self.check(not self.gold_rope or self.head_dim % 2 == 0, 'head_dim', 'must be even for RoPE')
    self.check(self.wkv_impl in WKV_IMPLEMENTATIONS, 'wkv_impl', f'known: {WKV_IMPLEMENTATIONS}')
    self.check(self.wkv_impl != 'fused' or fused_wkv_supports(self.head_dim, self.head_dim, self.wkv_chunk_size),
               'wkv_impl', f"'fused' needs config.model.head_dim={self.head_dim} and "
               f'config.model.wkv_chunk_size={self.wkv_chunk_size} to be powers of two >= 16')
    self.check(self.attention_impl in attention_ops.IMPLEMENTATIONS, 'attention_impl',
               f'known: {attention_ops.IMPLEMENTATIONS}')
    self.check(self.remat in stack.REMAT_POLICIES, 'remat', f'known: {sorted(stack.REMAT_POLICIES)}')
    self.check_dtype('dtype')
    self.check_dtype('param_dtype')

  @property
  def num_heads(self) -> int:
    return self.dim // self.head_dim

  @property
  def num_gold_layers(self) -> int:
    return self.num_layers - (2 * self.num_layers) // 3 if self.gold_layers < 0 else self.gold_layers

  @property
  def num_rwkv_layers(self) -> int:
    return self.num_layers - self.num_gold_layers

  @property
  def hidden_dim(self) -> int:
    return self.mlp_dim or int(self.dim * 3.5) // 32 * 32

  @property
  def kv_rank(self) -> int:
    return self.gold_lora_rank or max(self.dim // 16, 64)


@flax.struct.dataclass
class RWKVLayerCache:
  time_mix: TimeMixCache  # token shift + float32 wkv state
  channel_mix: ConvState  # token shift


@flax.struct.dataclass
class GoldLayerCache:
  time_mix: ConvState     # token shift of the query stream
  channel_mix: ConvState


@flax.struct.dataclass
class GoldFinchCaches:
  rwkv: list
  gold: list
  keys: GoldKeyCache | None  # None without GOLD layers (Finch)


def _dtypes(cfg: GoldFinchConfig) -> dict:
  return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _constrain(x: jax.Array) -> jax.Array:
  return sharding.constrain(x, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED))


class RWKVBlock(nnx.Module):
  """x + TimeMix(LN(x)), then + ChannelMix(LN(.))."""

  def __init__(self, cfg: GoldFinchConfig, layer: int, rngs: nnx.Rngs):
    dtypes = _dtypes(cfg)
    common = dict(layer=layer, num_layers=cfg.num_layers, out_init_scale=1.0 / (2 * cfg.num_layers), rngs=rngs,
                  **dtypes)
    self.ln1 = LayerNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])
    self.att = TimeMix(cfg.dim, cfg.num_heads, cfg.head_dim, variant=cfg.time_mix, mix_rank=cfg.mix_lora_rank,
                       decay_rank=cfg.decay_lora_rank, impl=cfg.wkv_impl, chunk_size=cfg.wkv_chunk_size, **common)
    self.ln2 = LayerNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])
    self.ffn = ChannelMix(cfg.dim, cfg.hidden_dim, **common)

  def __call__(self, x, positions, documents, cache: RWKVLayerCache | None):
    mixed, time_mix = self.att(self.ln1(x), positions, documents, None if cache is None else cache.time_mix)
    x = x + mixed
    mixed, channel_mix = self.ffn(self.ln2(x), documents, None if cache is None else cache.channel_mix)
    x = _constrain(x + mixed)
    return x, (None if cache is None else RWKVLayerCache(time_mix=time_mix, channel_mix=channel_mix))


class GoldBlock(nnx.Module):
  """x + GoldAttention(LN(x)), then + ChannelMix(LN(.))."""

  def __init__(self, cfg: GoldFinchConfig, layer: int, rngs: nnx.Rngs):
    dtypes = _dtypes(cfg)
    common = dict(layer=layer, num_layers=cfg.num_layers, out_init_scale=1.0 / (2 * cfg.num_layers), rngs=rngs,
                  **dtypes)
    self.ln1 = LayerNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])
    self.att = GoldAttention(cfg.dim, cfg.num_heads, cfg.head_dim, mix_rank=cfg.mix_lora_rank, kv_rank=cfg.kv_rank,
                             rope=cfg.gold_rope, rope_base=cfg.rope_base, impl=cfg.attention_impl, **common)
    self.ln2 = LayerNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])
    self.ffn = ChannelMix(cfg.dim, cfg.hidden_dim, **common)

  def __call__(self, x, positions, token_index, documents, kv, cache: GoldLayerCache | None, self_attention: bool):
    mixed, time_mix = self.att(self.ln1(x), positions, token_index, documents, kv,
                               None if cache is None else cache.time_mix, self_attention=self_attention)
    x = x + mixed
    mixed, channel_mix = self.ffn(self.ln2(x), documents, None if cache is None else cache.channel_mix)
    x = _constrain(x + mixed)
    return x, (None if cache is None else GoldLayerCache(time_mix=time_mix, channel_mix=channel_mix))


@registry.register('goldfinch')
class GoldFinch(SequenceModel):
  Config = GoldFinchConfig

  def __init__(self, config: GoldFinchConfig, *, rngs: nnx.Rngs):
    self.config = cfg = config
    dtypes = _dtypes(cfg)
    pd = dtypes['param_dtype']
    self.io = TokenIO(cfg.vocab_size, cfg.dim, tie_embeddings=cfg.tie_embeddings, scale_embeddings=False,
                      rngs=rngs, **dtypes)
    self.ln0 = LayerNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=pd)
    self.rwkv_layers = nnx.List([RWKVBlock(cfg, i, rngs) for i in range(cfg.num_rwkv_layers)])
    if cfg.num_gold_layers:
      self.compression = KeyCompression(cfg.dim, cfg.key_compression, rngs=rngs, **dtypes)
      self.gold_layers = nnx.List([GoldBlock(cfg, cfg.num_rwkv_layers + i, rngs) for i in range(cfg.num_gold_layers)])
    else:
      self.compression, self.gold_layers = None, nnx.List([])
    self.ln_out = LayerNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=pd)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """x0 = LN0(E[token]) [B, T, D]: the residual stream's start and the GOLD key/value source
    (in the activation layout, as the GOLD streams: see layers/gold_attention.shared_kv)."""
    return _constrain(self.ln0(self.io.embed_tokens(tokens)))

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: ModelCache | None = None, *,
               last_only: bool = False, capped: bool = True) -> tuple[jax.Array, ModelCache | None]:
    cfg = self.config
    caches: GoldFinchCaches | None = None if cache is None else cache.layers
    segments, cursor = locate(positions, None if cache is None else cache.cursor)
    token_index, documents = segments.index, segments.document
    x0 = self.embed(tokens)                                             # [B, T, D]

    def rwkv_fn(block: RWKVBlock, h, layer_cache):
      return block(h, positions, documents, layer_cache)

    x, rwkv_caches = stack.apply_layers(self.rwkv_layers, x0, None if caches is None else caches.rwkv, rwkv_fn,
                                        scan=False, remat=cfg.remat)
    gold_caches, key_cache = [], None
    if cfg.num_gold_layers:
      kv, key_cache = self._shared_kv(tokens, positions, token_index, documents, x0,
                                      self.compression.compress(x), cache)
      if last_only:  # early exit: GOLD only where the last position's output depends on
        window = min(x.shape[1], 2 * cfg.num_gold_layers + 1)
        x, positions, token_index, documents = (a[:, -window:] for a in (x, positions, token_index, documents))
      self_attention = cache is None and not last_only

      def gold_fn(block: GoldBlock, h, layer_cache):
        return block(h, positions, token_index, documents, kv, layer_cache, self_attention)

      x, gold_caches = stack.apply_layers(self.gold_layers, x, None if caches is None else caches.gold, gold_fn,
                                          scan=False, remat=cfg.remat)
    if last_only:
      x = x[:, -1:]
    logits = self.io.logits(self.ln_out(x), capped)                     # [B, T or 1, V]
    if cache is None:
      return logits, None
    return logits, cache.replace(cursor=cursor, layers=GoldFinchCaches(rwkv=rwkv_caches, gold=gold_caches,
                                                                     keys=key_cache))

  def _shared_kv(self, tokens, positions, token_index, documents, x0, compressed, cache):
    """The GOLD key/value streams over the cached tokens and these; the updated key cache."""
    if cache is None:
      kd = self.compression.decompress(x0, compressed)
      return shared_kv(kd, rms(x0), token_index, documents, positions), None
    keys: GoldKeyCache = cache.layers.keys
    past = keys.history(cache.cursor.next_index, cache.cursor.document)
    x0_all = jnp.concatenate([self.embed(past['tokens']), x0], axis=1)               # [B, S + T, D]
    compressed_all = jnp.concatenate([past['compressed'].astype(compressed.dtype), compressed], axis=1)
    join = lambda name, now: jnp.concatenate([past[name], now], axis=1)
    kd = self.compression.decompress(x0_all, compressed_all)
    kv = shared_kv(kd, rms(x0_all), join('index', token_index), join('documents', documents),
                   join('positions', positions))
    return kv, keys.write(tokens, compressed, token_index, positions)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype = jnp.bfloat16) -> ModelCache:
    rwkv = [RWKVLayerCache(time_mix=block.att.init_cache(batch, dtype), channel_mix=block.ffn.init_cache(batch, dtype))
            for block in self.rwkv_layers]
    gold = [GoldLayerCache(time_mix=block.att.init_cache(batch, dtype), channel_mix=block.ffn.init_cache(batch, dtype))
            for block in self.gold_layers]
    keys = (GoldKeyCache.create(batch, max_len, self.compression.compressed_dim, dtype)
            if self.config.num_gold_layers else None)
    return ModelCache(cursor=Cursor.create(batch), layers=GoldFinchCaches(rwkv=rwkv, gold=gold, keys=keys),
                      max_len=max_len)

  def flops_per_token(self, seq_len: int) -> float:
    """Forward matmul FLOPs per token (MaxText-style: 2 per multiply-add; attention halved by causality)."""
    cfg = self.config
    d, h, f, n = cfg.dim, cfg.head_dim, cfg.hidden_dim, cfg.num_heads
    channel_mix = 2 * (d * f + f * d + d * d)
    mix_lora = 2 * 2 * d * 5 * cfg.mix_lora_rank
    decay_lora = 2 * 2 * d * cfg.decay_lora_rank
    chunk = min(cfg.wkv_chunk_size, seq_len)
    # r, k, v, out and the gate (Finch) or W_v once more for the second value (Finch-C2, with a LoRA as
    # large as the decay's); the wkv: scores and values inside a chunk, the state read (r S) and update
    # (k^T v) per token.
    projections = 2 * d * d * 5 + mix_lora + decay_lora * (1 if cfg.time_mix == 'finch' else 2)
    wkv = 2 * 2 * n * h * mean_visible_keys(chunk, 0) + 2 * 2 * n * h * h
    rwkv = cfg.num_rwkv_layers * (projections + wkv + channel_mix)
    if not cfg.num_gold_layers:
      return rwkv + 2 * d * cfg.vocab_size
    c = d // cfg.key_compression
    shared = 2 * d * c + 2 * (d + c) * d
    # query (and its LoRA), out; per token of the key stretch: the k/v mix LoRAs and the k, v LoRAs.
    gold = (2 * 2 * d * d + 2 * 2 * d * cfg.mix_lora_rank + 2 * 2 * d * 2 * cfg.mix_lora_rank
            + 2 * 2 * 2 * d * cfg.kv_rank + 2 * 2 * d * mean_visible_keys(seq_len, 0) + channel_mix)
    return rwkv + shared + cfg.num_gold_layers * gold + 2 * d * cfg.vocab_size
