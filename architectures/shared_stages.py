"""The shared-keys stages (architectures/decoder.py): the keys every reader layer reads, computed once per call
from the output of the layers before them. Each is a mixin of a `Decoder` giving its hooks (`shared_keys`,
`init_shared_cache`, `shared_flops_per_token`) over parameters it builds on the model itself, so their paths are
the model's own (`kv_norm`, `key`, `value`; `compression`):

  SharedKV          YOCO's: K = RoPE(norm(x) W_K), V = norm(x) W_V, one global K/V cache read by every
                    cross-attention layer (architectures/yoco.CrossAttention).
  CompressedKeys    GoldFinch's: c = x W_down (D -> D / ratio) per token, cached with the token; the GOLD key and
                    value streams rebuilt from (x0 = the model's `embed` of the tokens, c) once per call
                    (layers/mixers/gold_attention.py).

YOCO and GoldFinch use one each; a hybrid (architectures/hybrid.py) the one its readers read.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from architectures.decoder import Call, DecoderConfig
from layers import sharding
from layers.blocks.kv_cache import KVCache
from layers.blocks.linear import Dense
from layers.blocks.rope import apply_rope
from layers.blocks.shared_keys import AFTER_CACHED, OWN, Keys, SharedKeys
from layers.mixers.gold_attention import GoldKeyCache, KeyCompression, rms, shared_streams


class SharedKV:
  """YOCO's stage: one K/V over the output of the layers before the readers, RoPE on the keys."""

  config: DecoderConfig
  kv_norm: nnx.Module
  key: Dense
  value: Dense
  kv_shape: tuple[int, int]  # (K/V heads, head size)
  kv_rope: FrozenDict        # apply_rope's keywords for the keys

  def build_shared_kv(self, cfg: DecoderConfig, kv_heads: int, head_dim: int, rope: FrozenDict,
                      rngs: nnx.Rngs) -> None:
    """The stage's norm (the family's) and K/V projections D -> [kv_heads, head_dim]."""
    self.kv_shape, self.kv_rope = (kv_heads, head_dim), rope
    self.kv_norm = cfg.make_norm(cfg.dim)
    kv_names = (sharding.EMBED, sharding.KV_HEADS, sharding.HEAD_DIM)
    self.key = Dense(cfg.dim, (kv_heads, head_dim), names=kv_names, rngs=rngs, **cfg.dtypes)
    self.value = Dense(cfg.dim, (kv_heads, head_dim), names=kv_names, rngs=rngs, **cfg.dtypes)

  def shared_keys(self, x: jax.Array, call: Call, cache: KVCache | None) -> tuple[SharedKeys, KVCache | None]:
    """K = RoPE(norm(x) W_K), V = norm(x) W_V of the writers' output x [B, T, D]: the call's keys (training)
    or the cache's and the call's (decoding), and the cache with the call's written."""
    kv_heads = (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_KV_HEADS, None)
    segments = call.segments
    h = self.kv_norm(x)
    k = sharding.constrain(apply_rope(self.key(h), segments.positions, **self.kv_rope), kv_heads)  # [B, T, K, H]
    v = sharding.constrain(self.value(h), kv_heads)                                              # [B, T, K, H]
    if cache is None:
      keys = Keys(k, v, segments.index, segments.document, own=OWN)
    else:
      keys, cache = cache.extend(k, v, segments.index, segments.document)
    return SharedKeys((keys.keys, keys.values), keys.index, keys.document, None, keys.own), cache

  def init_shared_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> KVCache:
    """The one global K/V every reader layer reads."""
    return KVCache.create(batch, max_len, *self.kv_shape, dtype, keeps_all=True)

  def shared_flops_per_token(self) -> float:
    """W_K and W_V, once per token for all the readers."""
    kv_heads, head_dim = self.kv_shape
    return 2 * self.config.dim * 2 * kv_heads * head_dim


class CompressedKeys:
  """GoldFinch's stage: compressed keys per token, decompressed with the token embeddings into the GOLD streams."""

  compression: KeyCompression
  config: DecoderConfig
  embed: Callable[[jax.Array], jax.Array]  # the model's: tokens (values) -> x0 [B, T, D], the GOLD value source

  def shared_keys(self, x: jax.Array, call: Call,
                  cache: GoldKeyCache | None) -> tuple[SharedKeys, GoldKeyCache | None]:
    """c = x W_down of the writers' output x [B, T, D]; the GOLD key/value streams over the cached tokens
    (rebuilt from their inputs and c) and these; the key cache with this call's inputs and c written."""
    compressed = self.compression.compress(x)                                       # [B, T, D / ratio]
    segments = call.segments
    if cache is None:
      kd = self.compression.decompress(call.embedded, compressed)
      return shared_streams(kd, rms(call.embedded), segments.index, segments.document, segments.positions,
                            OWN), None
    past = cache.history(call.cursor.next_index, call.cursor.document)
    x0 = jnp.concatenate([self.embed(past['inputs']), call.embedded], axis=1)         # [B, S + T, D]
    compressed_all = jnp.concatenate([past['compressed'].astype(compressed.dtype), compressed], axis=1)
    join = lambda name, now: jnp.concatenate([past[name], now], axis=1)
    kd = self.compression.decompress(x0, compressed_all)
    shared = shared_streams(kd, rms(x0), join('index', segments.index), join('document', segments.document),
                            join('positions', segments.positions), AFTER_CACHED)
    return shared, cache.write(call.inputs, compressed, segments.index, segments.positions)

  def init_shared_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> GoldKeyCache:
    """Token ids (or input values) and c per token: the only part of the cache that grows with the context."""
    return GoldKeyCache.create(batch, max_len, self.compression.compressed_dim, dtype, self.config.input_features)

  def shared_flops_per_token(self) -> float:
    return self.compression.flops_per_token()
