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
layers/blocks/kv_cache.py) holding only the token id (-1: empty or padding) and c
(forecasting: the F input values too, the token id then only marking a filled
slot); index, document and position of a slot follow from the cursor and the
row's `position_offset` (index - position of its last real token), so no
per-slot bookkeeping is stored. `history` lays the slots out oldest first, so
the cached tokens and the new ones form one consecutive stretch of the row.

`GoldAttention` is a mixer (layers/blocks/residual.py) whose fourth argument is the
shared streams (`shared_streams`: a layers/blocks/shared_keys.SharedKeys whose payload
is `GoldStreams`), built once per call by the model's shared-keys stage; its
own cache is its token shift.
"""
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import sharding
from layers.blocks import token_shift
from layers.blocks.conv1d import ConvState
from layers.blocks.layer_norm import LayerNorm
from layers.blocks.linear import Dense
from layers.blocks.rope import apply_rope
from layers.blocks.shared_keys import SharedKeys
from layers.documents import PAD_DOCUMENT, Segments
from layers.flops import Lengths, attention_flops, document_lengths, mean_visible_keys
from layers.kernels import attention_ops
from layers.mixers.rwkv_init import constant, layer_ratios, lora, lora_uniform, lora_zeros, mix_profile, per_layer


def rms(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """x / RMS(x) over the last axis, no weight (the reference's `rms_norm`), in float32."""
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True))
  return (x32 / (norm + eps)).astype(x.dtype)


# ---------------------------------------------------------------------------- the key cache

@flax.struct.dataclass
class GoldKeyCache:
  tokens: jax.Array           # [B, S] int32: the token id in each slot (forecasting: 0), -1 when empty or padding
  values: jax.Array | None    # [B, S, F] float32: the input values in each slot (forecasting), else None
  compressed: jax.Array       # [B, S, D / ratio]: c_t
  position_offset: jax.Array  # [B] int32: index - position of the row's last real token

  @classmethod
  def create(cls, batch: int, slots: int, compressed_dim: int, dtype: jnp.dtype,
             features: int = 0) -> 'GoldKeyCache':
    """`features` > 0: the model's inputs are F values per token (forecasting), not token ids."""
    return cls(tokens=jnp.full((batch, slots), -1, jnp.int32),
               values=jnp.zeros((batch, slots, features), jnp.float32) if features else None,
               compressed=jnp.zeros((batch, slots, compressed_dim), dtype),
               position_offset=jnp.zeros((batch,), jnp.int32))

  @property
  def num_slots(self) -> int:
    return self.tokens.shape[1]

  def history(self, next_index: jax.Array, document: jax.Array) -> dict:
    """The slots oldest first, for a row whose next token has index `next_index` [B] and whose
    last token was in document `document` [B]: inputs (token ids [B, S] or values [B, S, F]; 0 where
    not current), compressed, index, document, positions. Slots of earlier documents, padding and
    empty slots get document -1 (visible to nobody)."""
    index = next_index[:, None] - self.num_slots + jnp.arange(self.num_slots, dtype=jnp.int32)  # [B, S]
    slot = jnp.mod(index, self.num_slots)
    tokens = jnp.take_along_axis(self.tokens, slot, axis=1)
    compressed = jnp.take_along_axis(self.compressed, slot[..., None], axis=1)
    positions = index - self.position_offset[:, None]
    current = (index >= 0) & (tokens >= 0) & (positions >= 0)
    documents = jnp.where(current, document[:, None], PAD_DOCUMENT)
    if self.values is None:
      inputs = jnp.where(current, tokens, 0)
    else:
      inputs = jnp.where(current[..., None], jnp.take_along_axis(self.values, slot[..., None], axis=1), 0)
    return dict(inputs=inputs, compressed=compressed, index=index, document=documents,
                positions=jnp.where(current, positions, 0))

  def write(self, inputs: jax.Array, compressed: jax.Array, token_index: jax.Array,
            positions: jax.Array) -> 'GoldKeyCache':
    """Stores the last min(T, S) tokens (token ids [B, T], or values [B, T, F]; padding as -1) at
    slot = index mod S; tracks the offset."""
    n = min(inputs.shape[1], self.num_slots)
    slots = token_index[:, -n:] % self.num_slots
    rows = jnp.arange(inputs.shape[0])[:, None]
    real = positions >= 0
    last = jnp.max(jnp.where(real, jnp.arange(inputs.shape[1]), -1), axis=1)  # [B]: the last real token
    offset = jnp.take_along_axis(token_index - positions, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
    tokens = jnp.where(real, inputs if self.values is None else 0, -1)
    values = None if self.values is None else self.values.at[rows, slots].set(
        inputs[:, -n:].astype(self.values.dtype))
    return GoldKeyCache(
        tokens=self.tokens.at[rows, slots].set(tokens[:, -n:]), values=values,
        compressed=self.compressed.at[rows, slots].set(compressed[:, -n:].astype(self.compressed.dtype)),
        position_offset=jnp.where(last >= 0, offset, self.position_offset))


# ---------------------------------------------------------------------------- shared keys

@flax.struct.dataclass
class GoldStreams:
  """What every GOLD layer derives its keys and values from, over the visible stretch of the row."""
  keys: jax.Array         # [B, S, D] kd (decompressed keys)
  keys_prev: jax.Array    # [B, S, D] token shift of kd
  embeds: jax.Array       # [B, S, D] xo = rms(x0)
  embeds_prev: jax.Array  # [B, S, D] token shift of xo


def shared_streams(keys: jax.Array, embeds: jax.Array, index: jax.Array, document: jax.Array,
                   positions: jax.Array, own: str) -> SharedKeys:
  """The streams kd, xo [B, S, D] at token index, document and positions [B, S] (keys related to the
  queries as `own`, layers/blocks/shared_keys.py), with their token shifts: the previous element of the stretch
  when it is of the same document.

  The four streams [B, S, D] are pinned to the activation layout (batch over the data axes): left
  to sharding propagation, the program XLA partitioned (jax 0.10.2, Shardy and GSPMD alike) gave
  wrong values for the rows held where the data and fsdp coordinates differ on a data=2, fsdp=2
  mesh (tests/test_goldfinch.py and test_family_contract.py: sharded == one device)."""
  constrain = lambda x: sharding.constrain(x, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED))
  keys, embeds = constrain(keys), constrain(embeds)
  keys_prev, _ = token_shift.token_shift(keys, document)
  embeds_prev, _ = token_shift.token_shift(embeds, document)
  streams = GoldStreams(keys, constrain(keys_prev), embeds, constrain(embeds_prev))
  return SharedKeys(streams, index, document, positions, own)


class KeyCompression(nnx.Module):
  """c = h W_down (D -> D / ratio) and the TokenCat decompression kd = rms(concat(x0, c) W_up)."""

  def __init__(self, dim: int, ratio: int, *, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    if dim % ratio:
      raise ValueError(f'key compression ratio {ratio} does not divide dim {dim}')
    self.dim, self.compressed_dim = dim, dim // ratio
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.down = Dense(dim, self.compressed_dim, names=(sharding.EMBED, None), **common)
    self.up = Dense(dim + self.compressed_dim, dim, names=(None, sharding.EMBED), **common)

  def flops_per_token(self) -> float:
    """W_down once, W_up once per token (training: the stretch of keys is the tokens)."""
    d, c = self.dim, self.compressed_dim
    return 2 * d * c + 2 * (d + c) * d

  def compress(self, h: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D / ratio]
    return self.down(h)

  def decompress(self, x0: jax.Array, compressed: jax.Array) -> jax.Array:  # -> [B, T, D]
    return rms(self.up(jnp.concatenate([x0, compressed.astype(x0.dtype)], axis=-1)))


# ---------------------------------------------------------------------------- one GOLD layer

def gold_init(dim: int, layer: int, num_layers: int) -> dict[str, np.ndarray]:
  """The layer-dependent initial values of a GOLD layer: its lerp profiles and ln_x scale."""
  r0, r1 = layer_ratios(layer, num_layers)
  return dict(mix_x=mix_profile(dim, r1), mix_q=mix_profile(dim, 0.5 * r1), mix_c=mix_profile(dim, r1),
              mix_k=mix_profile(dim, r1), mix_v=mix_profile(dim, r1, 0.3 * r0),
              ln_scale=np.float32(((layer + 1) / num_layers) ** 0.7))


class GoldAttention(nnx.Module):
  """One GOLD layer's attention (the equations above): a mixer that reads the shared streams, whose cache
  is the token shift of its queries' stream."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, layer: int | jax.Array, num_layers: int,
               mix_rank: int = 32, kv_rank: int = 0, rope: bool = False, rope_base: float = 10000.0,
               impl: str = 'xla', out_init_scale: float = 1.0, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if num_heads * head_dim != dim:
      raise ValueError(f'num_heads {num_heads} x head_dim {head_dim} must equal dim {dim}')
    kv_rank = kv_rank or max(dim // 16, 64)
    self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
    self.mix_rank, self.kv_rank = mix_rank, kv_rank
    self.rope, self.rope_base, self.impl = rope, rope_base, impl
    self.dtype = dtype
    init = per_layer(lambda i: gold_init(dim, i, num_layers), layer, num_layers)
    pd = param_dtype
    embed = (sharding.EMBED,)
    self.mix_x = constant(init['mix_x'], embed, pd)
    self.mix_q = constant(init['mix_q'], embed, pd)
    self.mix_c = constant(init['mix_c'], embed, pd)
    self.mix_k = constant(init['mix_k'], embed, pd)
    self.mix_v = constant(init['mix_v'], embed, pd)
    self.q_lora_a = lora_zeros((dim, mix_rank), (sharding.EMBED, None), pd)
    self.q_lora_b = lora_uniform(rngs, (mix_rank, dim), (None, sharding.EMBED), pd)
    self.kv_lora_a = lora_zeros((dim, 2, mix_rank), (sharding.EMBED, None, None), pd)
    self.kv_lora_b = lora_uniform(rngs, (2, mix_rank, dim), (None, None, sharding.EMBED), pd)
    self.k_lora_a = lora_zeros((dim, kv_rank), (sharding.EMBED, None), pd)
    self.k_lora_b = lora_uniform(rngs, (kv_rank, dim), (None, sharding.EMBED), pd)
    self.v_lora_a = lora_zeros((dim, kv_rank), (sharding.EMBED, None), pd)
    self.v_lora_b = lora_uniform(rngs, (kv_rank, dim), (None, sharding.EMBED), pd)
    common = dict(dtype=dtype, param_dtype=pd, rngs=rngs)
    heads = (sharding.HEADS, sharding.HEAD_DIM)
    self.query = Dense(dim, (num_heads, head_dim), names=(sharding.EMBED, *heads), **common)
    self.output = Dense((num_heads, head_dim), dim, names=(*heads, sharding.EMBED), init_scale=out_init_scale,
                        **common)
    self.ln_q = LayerNorm((num_heads, head_dim), param_dtype=pd)
    self.ln_k = LayerNorm(dim, param_dtype=pd)
    self.ln_v = LayerNorm(dim, param_dtype=pd)
    self.ln_x = LayerNorm((num_heads, head_dim), scale_init=init['ln_scale'], param_dtype=pd)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> ConvState:
    """The queries' token shift; the keys live in the model's one GoldKeyCache."""
    del max_len
    return token_shift.init_state(batch, self.dim, dtype)

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    """W_q and its ddlerp LoRA, W_o; per key (training: one per token) the k / v mix LoRAs and the k and v
    LoRAs; attention over the keys each query sees in its document (layers/flops.py)."""
    d = self.dim
    projections = 2 * 2 * d * d + 2 * 2 * d * self.mix_rank
    keys_values = 2 * 2 * d * 2 * self.mix_rank + 2 * 2 * 2 * d * self.kv_rank
    keys = mean_visible_keys(document_lengths(seq_len, doc_lengths))
    return projections + keys_values + attention_flops(self.num_heads, self.head_dim, keys)

  def keys_values(self, streams: GoldStreams) -> tuple[jax.Array, jax.Array]:
    """This layer's k, v [B, S, N, H] from the shared streams."""
    d = self.dtype
    xo, dxo = streams.embeds.astype(d), (streams.embeds_prev - streams.embeds).astype(d)
    h = jnp.tanh(jnp.einsum('bsd,dmr->bsmr', xo + dxo * self.mix_c[...].astype(d), self.kv_lora_a[...].astype(d)))
    mk, mv = jnp.moveaxis(jnp.einsum('bsmr,mrd->bsmd', h, self.kv_lora_b[...].astype(d)), 2, 0)
    kd, dkd = streams.keys.astype(d), (streams.keys_prev - streams.keys).astype(d)
    k = kd + dkd * (self.mix_k[...].astype(d) + mk)
    v = xo + dxo * (self.mix_v[...].astype(d) + mv)
    k = self.ln_k(k + lora(k, self.k_lora_a[...], self.k_lora_b[...], d))
    v = self.ln_v(v + lora(v, self.v_lora_a[...], self.v_lora_b[...], d))
    split = lambda a: a.reshape(*a.shape[:-1], self.num_heads, self.head_dim)
    return split(k), split(v)

  def __call__(self, x: jax.Array, segments: Segments, cache: ConvState | None,
               shared: SharedKeys) -> tuple[jax.Array, ConvState | None]:
    """x [B, T, D] at `segments`; keys over the S positions of `shared` (`shared_streams`) -> y [B, T, D],
    shift state. The kernel path follows shared.own (attention_ops.attend)."""
    heads = (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_HEADS, None)
    d = self.dtype
    x_prev, cache = token_shift.token_shift(x, segments.document, cache)
    dx = x_prev - x
    mq = lora(x + dx * self.mix_x[...].astype(x.dtype), self.q_lora_a[...], self.q_lora_b[...], d)
    q = self.ln_q(self.query(x + dx * (self.mix_q[...].astype(d) + mq)))     # [B, T, N, H]
    k, v = self.keys_values(shared.payload)                                   # [B, S, N, H]
    if self.rope:
      q = apply_rope(q, segments.positions, base=self.rope_base)
      k = apply_rope(k, shared.positions, base=self.rope_base)
    q, k, v = (sharding.constrain(a, heads) for a in (q, k, v))
    o = attention_ops.attend(q, segments, shared.attended(k, v), None, self.head_dim ** -0.5, self.impl)
    return self.output(sharding.constrain(self.ln_x(o), heads)), cache
