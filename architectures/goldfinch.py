"""GoldFinch (Goldstein et al. 2024, arXiv 2407.12077) and Finch (RWKV-6), docs/architectures.md, GoldFinch.

Pre-norm residual blocks with LayerNorms and the channel mix as MLP (the RWKV layout, layers/blocks/residual.py):

    x = LN0(E[token]);  x0 = x                        (x0: the normalised token embedding)
    x = x + TimeMix(LN1(x));  x = x + ChannelMix(LN2(x))          layers 0 .. F-1 (RWKV-6)
    c = x W_down                                      (D -> D / 16, once, after the last RWKV layer)
    x = x + GoldAttention(LN1(x); c, x0);  x = x + ChannelMix(LN2(x))   layers F .. L-1 (GOLD)
    logits = LN_out(x) W_out

F = int(2L / 3) by default (`gold_layers=-1`; the reference's inv_other_layer_ratio 3); the
RWKV layers are Finch-C2 (`time_mix='finch_c2'`) in GoldFinch. `gold_layers=0` makes the
whole stack RWKV: with `time_mix='finch'` that is Finch (RWKV-6, the paper's baseline),
with 'finch_c2' the Finch-C2 ablation. Layers live in layers/mixers/rwkv6.py, layers/mixers/wkv.py,
layers/blocks/token_shift.py and layers/mixers/gold_attention.py. With `input_features` F > 0 the ends
are a forecaster's (layers/blocks/series_io.py): E[token] is the values' projection.

Decode cache, per batch row, for a context of n tokens (b bytes per element of the
cache dtype; H = head size, N = D / H heads, F RWKV and G GOLD layers):

    cursor                                 8
    each RWKV layer: wkv state             N H^2 * 4          (float32)
                     two token shifts      2 (D b + 4)        (last input + its document)
    each GOLD layer: two token shifts      2 (D b + 4)
    GOLD key cache (if G > 0):             n (4 + (D / 16) b) + 4   (token id + c_t per token,
                                                                     + the row's position offset)

(forecasting: the F input values per token besides, n F 4 bytes), so the part that
grows with the context is 1 + D/16 numbers per token, whatever the depth (a Transformer
of the same shape keeps 2 D numbers per token and layer, plus 8 bytes of slot
bookkeeping: L (2 D b + 8) bytes). Finch's cache does not grow at all.

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

import jax
from flax import nnx

from architectures import registry
from architectures.base import ModelConfig
from architectures.decoder import Decoder, DecoderConfig
from architectures.shared_stages import CompressedKeys
from layers import sharding
from layers.blocks import stack
from layers.blocks.residual import ResidualBlock
from layers.kernels.pallas_wkv import supports as fused_wkv_supports
from layers.mixers.gold_attention import GoldAttention, KeyCompression
from layers.mixers.rwkv6 import VARIANTS, ChannelMix, TimeMix
from layers.mixers.wkv import IMPLEMENTATIONS as WKV_IMPLEMENTATIONS


@dataclasses.dataclass(frozen=True)
class GoldFinchConfig(DecoderConfig):
  runtime_fields: ClassVar[tuple[str, ...]] = ModelConfig.runtime_fields + ('wkv_impl', 'wkv_chunk_size')
  norm: ClassVar[str] = 'layer'  # LayerNorms with a bias (RWKV)

  num_layers: int = 3
  mlp_dim: int = 0               # channel-mix width; 0: int(3.5 D) // 32 * 32 (the reference's dim_ffn)
  norm_eps: float = 1e-5
  head_dim: int = 64             # RWKV and GOLD heads: num_heads = dim / head_dim
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

  def __post_init__(self):
    super().__post_init__()
    self.check_positive('head_dim', 'key_compression', 'mix_lora_rank', 'decay_lora_rank', 'wkv_chunk_size')
    self.check(self.dim % self.head_dim == 0, 'head_dim', f'does not divide config.model.dim={self.dim}')
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


@registry.register('goldfinch')
class GoldFinch(CompressedKeys, Decoder):
  """The generic decoder: the RWKV blocks (`layers`), the compressed key cache (the shared-keys stage,
  architectures/shared_stages.py), the GOLD
  blocks (`gold_layers`, None in Finch) reading its streams; each stack scanned or not."""

  Config = GoldFinchConfig
  reader_stacks = ('gold_layers',)

  def __init__(self, config: GoldFinchConfig, *, rngs: nnx.Rngs):
    self.config = cfg = config
    self.io = cfg.make_io(rngs, scale_embeddings=False)
    self.embed_norm = cfg.make_norm(cfg.dim)
    self.layers = stack.create_indexed_layers(lambda i, r: self.make_rwkv_block(cfg, i, r),
                                              range(cfg.num_rwkv_layers), rngs, scan=cfg.scan_layers)
    if cfg.num_gold_layers:
      self.compression = KeyCompression(cfg.dim, cfg.key_compression, rngs=rngs, **cfg.dtypes)
      self.gold_layers = stack.create_indexed_layers(lambda i, r: self.make_gold_block(cfg, i, r),
                                                     range(cfg.num_rwkv_layers, cfg.num_layers), rngs,
                                                     scan=cfg.scan_layers)
    else:
      self.compression, self.gold_layers = None, None
    self.final_norm = cfg.make_norm(cfg.dim)

  @classmethod
  def make_rwkv_block(cls, cfg: GoldFinchConfig, layer: int | jax.Array, rngs: nnx.Rngs) -> ResidualBlock:
    mixer = TimeMix(cfg.dim, cfg.num_heads, cfg.head_dim, layer=layer, num_layers=cfg.num_layers,
                    variant=cfg.time_mix, mix_rank=cfg.mix_lora_rank, decay_rank=cfg.decay_lora_rank,
                    impl=cfg.wkv_impl, chunk_size=cfg.wkv_chunk_size, out_init_scale=cfg.residual_init_scale,
                    rngs=rngs, **cfg.dtypes)
    return cls.make_block(cfg, mixer, layer, rngs)

  @classmethod
  def make_gold_block(cls, cfg: GoldFinchConfig, layer: int | jax.Array, rngs: nnx.Rngs) -> ResidualBlock:
    mixer = GoldAttention(cfg.dim, cfg.num_heads, cfg.head_dim, layer=layer, num_layers=cfg.num_layers,
                          mix_rank=cfg.mix_lora_rank, kv_rank=cfg.kv_rank, rope=cfg.gold_rope,
                          rope_base=cfg.rope_base, impl=cfg.attention_impl, out_init_scale=cfg.residual_init_scale,
                          rngs=rngs, **cfg.dtypes)
    return cls.make_block(cfg, mixer, layer, rngs)

  @staticmethod
  def make_block(cfg: GoldFinchConfig, mixer: TimeMix | GoldAttention, layer: int | jax.Array,
                 rngs: nnx.Rngs) -> ResidualBlock:
    """The RWKV block of layer `layer` around `mixer`: LayerNorms, and the channel mix as its MLP."""
    channel_mix = ChannelMix(cfg.dim, cfg.hidden_dim, layer=layer, num_layers=cfg.num_layers,
                             out_init_scale=cfg.residual_init_scale, rngs=rngs, **cfg.dtypes)
    return ResidualBlock(cfg.dim, mixer, channel_mix, norm=cfg.make_norm)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """x0 = LN0(E[token]) [B, T, D]: the residual stream's start and the GOLD key/value source
    (in the activation layout, as the GOLD streams: see layers/mixers/gold_attention.shared_streams)."""
    return sharding.constrain(self.embed_norm(self.io.embed_tokens(tokens)),
                              (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED))

  def reader_window(self) -> int:
    """2G + 1: each GOLD block's two token shifts (time mix and channel mix) reach one position back."""
    return 2 * self.config.num_gold_layers + 1
