"""GOLD attention (GoldFinch, Goldstein et al. 2024; docs/architectures.md, GoldFinch): softmax attention
whose keys come from ONE compressed cache for the whole model and whose values
come from the token embeddings, so a GOLD layer has no K/V weights of its own.

Shared by every GOLD layer (computed once per call):

    c_t  = h_t W_down                         h: the residual stream after the last Finch-C2
                                              layer; D -> D / ratio (16): the compressed key
    kd_t = rms(concat(x0_t, c_t) W_up)        TokenCat decompression; x0 = LayerNorm(E[token])
    xo_t = rms(x0_t)                          (rms: weightless RMS normalisation)

The decode cache of the GOLD part is only (token id, c_t) per token
(`GoldKeyCache`): 1 + D / 16 numbers, against 2 D per layer for a Transformer.
Each GOLD layer, with its own token shift of x and of the key/value streams
(`kd_prev`, `xo_prev`: the previous token of the same document, else 0):

    q = LN_q(W_q ddlerp(x))                                   (LoRA rank 32)
    mk, mv = tanh(lerp(xo, xo_prev, mu_c) A) B                (two LoRAs, rank 32)
    k = lerp(kd, kd_prev, mu_k + mk);  k = LN_k(k + tanh(k A_k) B_k)
    v = lerp(xo, xo_prev, mu_v + mv);  v = LN_v(v + tanh(v A_v) B_v)   (rank max(D/16, 64))
    out = W_o LN_x(softmax attention(q, k, v))                (causal, within the document;
                                                               RoPE on q, k optional)

`GoldKeyCache` is a ring of S slots (token index i in slot i mod S, as
layers/kv_cache.py) holding only the token id (-1: empty or padding) and c;
index, document and position of a slot follow from the cursor and the row's
`position_offset` (index - position of its last real token), so no per-slot
bookkeeping is stored. `history` lays the slots out oldest first, so the
cached tokens and the new ones form one consecutive stretch of the row.
"""
import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from layers import attention_ops, sharding, token_shift
from layers.conv1d import ConvState
from layers.documents import PAD_DOCUMENT
from layers.layer_norm import LayerNorm
from layers.linear import Dense
from layers.rope import apply_rope
from layers.rwkv6 import constant, layer_ratios, lora, mix_profile, uniform, zeros


def rms(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """x / RMS(x) over the last axis, no weight (the reference's `rms_norm`), in float32."""
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True))
  return (x32 / (norm + eps)).astype(x.dtype)


# ---------------------------------------------------------------------------- the key cache

@flax.struct.dataclass
class GoldKeyCache:
  tokens: jax.Array           # [B, S] int32: the token id in each slot, -1 when empty or padding
  compressed: jax.Array       # [B, S, D / ratio]: c_t
  position_offset: jax.Array  # [B] int32: index - position of the row's last real token

  @classmethod
  def create(cls, batch: int, slots: int, compressed_dim: int, dtype: jnp.dtype) -> 'GoldKeyCache':
    return cls(tokens=jnp.full((batch, slots), -1, jnp.int32),
               compressed=jnp.zeros((batch, slots, compressed_dim), dtype),
               position_offset=jnp.zeros((batch,), jnp.int32))

  @property
  def num_slots(self) -> int:
    return self.tokens.shape[1]

  def history(self, next_index: jax.Array, document: jax.Array) -> dict:
    """The slots oldest first, for a row whose next token has index `next_index` [B] and whose
    last token was in document `document` [B]: tokens, compressed, index, documents, positions.
    Slots of earlier documents, padding and empty slots get document -1 (visible to nobody)."""
    index = next_index[:, None] - self.num_slots + jnp.arange(self.num_slots, dtype=jnp.int32)  # [B, S]
    slot = jnp.mod(index, self.num_slots)
    tokens = jnp.take_along_axis(self.tokens, slot, axis=1)
    compressed = jnp.take_along_axis(self.compressed, slot[..., None], axis=1)
    positions = index - self.position_offset[:, None]
    current = (index >= 0) & (tokens >= 0) & (positions >= 0)
    documents = jnp.where(current, document[:, None], PAD_DOCUMENT)
    return dict(tokens=jnp.where(current, tokens, 0), compressed=compressed, index=index, documents=documents,
                positions=jnp.where(current, positions, 0))

  def write(self, tokens: jax.Array, compressed: jax.Array, token_index: jax.Array,
            positions: jax.Array) -> 'GoldKeyCache':
    """Stores the last min(T, S) tokens (padding as -1) at slot = index mod S; tracks the offset."""
    n = min(tokens.shape[1], self.num_slots)
    slots = token_index[:, -n:] % self.num_slots
    rows = jnp.arange(tokens.shape[0])[:, None]
    real = positions >= 0
    last = jnp.max(jnp.where(real, jnp.arange(tokens.shape[1]), -1), axis=1)  # [B]: the last real token
    offset = jnp.take_along_axis(token_index - positions, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
    return GoldKeyCache(
        tokens=self.tokens.at[rows, slots].set(jnp.where(real, tokens, -1)[:, -n:]),
        compressed=self.compressed.at[rows, slots].set(compressed[:, -n:].astype(self.compressed.dtype)),
        position_offset=jnp.where(last >= 0, offset, self.position_offset))


# ---------------------------------------------------------------------------- shared keys

@dataclasses.dataclass(frozen=True)
class GoldKV:
  """What every GOLD layer reads: the key/value streams over the visible stretch of the row."""
  keys: jax.Array         # [B, S, D] kd (decompressed keys)
  keys_prev: jax.Array    # [B, S, D] token shift of kd
  embeds: jax.Array       # [B, S, D] xo = rms(x0)
  embeds_prev: jax.Array  # [B, S, D] token shift of xo
  index: jax.Array        # [B, S] int32
  documents: jax.Array    # [B, S] int32 (-1: visible to nobody)
  positions: jax.Array    # [B, S] int32 (RoPE)


def shared_kv(keys: jax.Array, embeds: jax.Array, index: jax.Array, documents: jax.Array,
              positions: jax.Array) -> GoldKV:
  """Adds the token shifts: the previous element of the stretch when it is of the same document.

  The four streams [B, S, D] are pinned to the activation layout (batch over the data axes): left
  to sharding propagation, the program XLA partitioned (jax 0.10.2, Shardy and GSPMD alike) gave
  wrong values for the rows held where the data and fsdp coordinates differ on a data=2, fsdp=2
  mesh (tests/test_goldfinch.py and test_family_contract.py: sharded == one device)."""
  constrain = lambda x: sharding.constrain(x, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED))
  keys, embeds = constrain(keys), constrain(embeds)
  keys_prev, _ = token_shift.token_shift(keys, documents)
  embeds_prev, _ = token_shift.token_shift(embeds, documents)
  return GoldKV(keys, constrain(keys_prev), embeds, constrain(embeds_prev), index, documents, positions)


class KeyCompression(nnx.Module):
  """c = h W_down (D -> D / ratio) and the TokenCat decompression kd = rms(concat(x0, c) W_up)."""

  def __init__(self, dim: int, ratio: int, *, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    if dim % ratio:
      raise ValueError(f'key compression ratio {ratio} does not divide dim {dim}')
    self.compressed_dim = dim // ratio
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.down = Dense(dim, self.compressed_dim, names=(sharding.EMBED, None), **common)
    self.up = Dense(dim + self.compressed_dim, dim, names=(None, sharding.EMBED), **common)

  def compress(self, h: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D / ratio]
    return self.down(h)

  def decompress(self, x0: jax.Array, compressed: jax.Array) -> jax.Array:  # -> [B, T, D]
    return rms(self.up(jnp.concatenate([x0, compressed.astype(x0.dtype)], axis=-1)))


# ---------------------------------------------------------------------------- one GOLD layer

class GoldAttention(nnx.Module):

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, layer: int, num_layers: int, mix_rank: int = 32,
               kv_rank: int = 0, rope: bool = False, rope_base: float = 10000.0, impl: str = 'xla',
               out_init_scale: float = 1.0, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    if num_heads * head_dim != dim:
      raise ValueError(f'num_heads {num_heads} x head_dim {head_dim} must equal dim {dim}')
    self.num_heads, self.head_dim = num_heads, head_dim
    self.rope, self.rope_base, self.impl = rope, rope_base, impl
    self.dtype = dtype
    kv_rank = kv_rank or max(dim // 16, 64)
    r0, r1 = layer_ratios(layer, num_layers)
    pd = param_dtype
    embed = (sharding.EMBED,)
    self.mix_x = constant(mix_profile(dim, r1), embed, pd)
    self.mix_q = constant(mix_profile(dim, 0.5 * r1), embed, pd)
    self.mix_c = constant(mix_profile(dim, r1), embed, pd)
    self.mix_k = constant(mix_profile(dim, r1), embed, pd)
    self.mix_v = constant(mix_profile(dim, r1, 0.3 * r0), embed, pd)
    self.q_lora_a = zeros((dim, mix_rank), (sharding.EMBED, None), pd)
    self.q_lora_b = uniform(rngs, (mix_rank, dim), (None, sharding.EMBED), pd)
    self.kv_lora_a = zeros((dim, 2, mix_rank), (sharding.EMBED, None, None), pd)
    self.kv_lora_b = uniform(rngs, (2, mix_rank, dim), (None, None, sharding.EMBED), pd)
    self.k_lora_a = zeros((dim, kv_rank), (sharding.EMBED, None), pd)
    self.k_lora_b = uniform(rngs, (kv_rank, dim), (None, sharding.EMBED), pd)
    self.v_lora_a = zeros((dim, kv_rank), (sharding.EMBED, None), pd)
    self.v_lora_b = uniform(rngs, (kv_rank, dim), (None, sharding.EMBED), pd)
    common = dict(dtype=dtype, param_dtype=pd, rngs=rngs)
    heads = (sharding.HEADS, sharding.HEAD_DIM)
    self.query = Dense(dim, (num_heads, head_dim), names=(sharding.EMBED, *heads), **common)
    self.output = Dense((num_heads, head_dim), dim, names=(*heads, sharding.EMBED), init_scale=out_init_scale,
                        **common)
    self.ln_q = LayerNorm((num_heads, head_dim), param_dtype=pd)
    self.ln_k = LayerNorm(dim, param_dtype=pd)
    self.ln_v = LayerNorm(dim, param_dtype=pd)
    self.ln_x = LayerNorm((num_heads, head_dim), scale_init=((layer + 1) / num_layers) ** 0.7, param_dtype=pd)

  def init_cache(self, batch: int, dtype: jnp.dtype) -> ConvState:
    return token_shift.init_state(batch, self.num_heads * self.head_dim, dtype)

  def keys_values(self, kv: GoldKV) -> tuple[jax.Array, jax.Array]:
    """This layer's k, v [B, S, N, H] from the shared streams."""
    d = self.dtype
    xo, dxo = kv.embeds.astype(d), (kv.embeds_prev - kv.embeds).astype(d)
    h = jnp.tanh(jnp.einsum('bsd,dmr->bsmr', xo + dxo * self.mix_c[...].astype(d), self.kv_lora_a[...].astype(d)))
    mk, mv = jnp.moveaxis(jnp.einsum('bsmr,mrd->bsmd', h, self.kv_lora_b[...].astype(d)), 2, 0)
    kd, dkd = kv.keys.astype(d), (kv.keys_prev - kv.keys).astype(d)
    k = kd + dkd * (self.mix_k[...].astype(d) + mk)
    v = xo + dxo * (self.mix_v[...].astype(d) + mv)
    k = self.ln_k(k + lora(k, self.k_lora_a[...], self.k_lora_b[...], d))
    v = self.ln_v(v + lora(v, self.v_lora_a[...], self.v_lora_b[...], d))
    split = lambda a: a.reshape(*a.shape[:-1], self.num_heads, self.head_dim)
    return split(k), split(v)

  def __call__(self, x: jax.Array, positions: jax.Array, token_index: jax.Array, documents: jax.Array,
               kv: GoldKV, shift: ConvState | None = None, *, self_attention: bool = False
               ) -> tuple[jax.Array, ConvState | None]:
    """x [B, T, D] and its positions, index, documents [B, T]; kv over S keys -> y [B, T, D], shift state.

    `self_attention`: the keys are exactly these T tokens (training), so cuDNN may serve."""
    heads = (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_HEADS, None)
    d = self.dtype
    x_prev, shift = token_shift.token_shift(x, documents, shift)
    dx = x_prev - x
    mq = lora(x + dx * self.mix_x[...].astype(x.dtype), self.q_lora_a[...], self.q_lora_b[...], d)
    q = self.ln_q(self.query(x + dx * (self.mix_q[...].astype(d) + mq)))     # [B, T, N, H]
    k, v = self.keys_values(kv)
    if self.rope:
      q = apply_rope(q, positions, base=self.rope_base)
      k = apply_rope(k, kv.positions, base=self.rope_base)
    q, k, v = (sharding.constrain(a, heads) for a in (q, k, v))
    scale = self.head_dim ** -0.5
    impl = attention_ops.resolve_impl(self.impl, d, self.head_dim) if self_attention else 'xla'
    if impl == 'cudnn':
      o = attention_ops.cudnn_self_attention(q, k, v, documents, None, scale)
    else:
      o = attention_ops.attend_visible(q, k, v, token_index, documents, kv.index, kv.documents, None, scale)
    return self.output(sharding.constrain(self.ln_x(o), heads)), shift
