"""RWKV-6 ("Finch") time-mix and channel-mix (Peng et al. 2024; docs/architectures.md, GoldFinch).

Time-mix, on x [B, T, D] with x_prev its token shift (layers/blocks/token_shift.py), dx = x_prev - x:

    xx = x + dx * mu_x;   m_i = tanh(xx A_i) B_i          (LoRA, rank `mix_rank`, one per branch i)
    x_i = x + dx * (mu_i + m_i)                           (data-dependent lerp, "ddlerp")
    r, k, v = W_r x_r, W_k x_k, W_v x_v                   ([B, T, N, H]: N heads of H channels)
    w = d + tanh(x_w A_w) B_w;  log w_t = -exp(w)         (data-dependent decay, rank `decay_rank`)
    y = wkv(r, k, v, log w, u)                            (layers/mixers/wkv.py; per-head matrix state)

then, by `variant`:

  'finch'     (RWKV-6, tmix_x060): g = silu(W_g x_g); out = W_o(GroupNorm_heads(y) * g),
              bonus u learned.
  'finch_c2'  (GoldFinch's Finch-C2, tmix_x060c2): no gate, k <- k * (1 - w_t), u = 0, a second value
              v2 = W_v x_v2 + tanh(x_v2 A) B (its own ddlerp; the same W_v); out = W_o(LayerNorm(y + v2))
              with the LayerNorm over all heads together.

Channel-mix (cmix_x060): k = relu(W_k lerp(x, x_prev, mu_k))^2 (width F = 3.5 D),
out = sigmoid(W_r lerp(x, x_prev, mu_r)) * (W_v k).

Both follow the mixer protocol (layers/blocks/residual.py: `(x, segments, cache)`,
`init_cache`, `flops_per_token`); their cache is the token shift (and the
time-mix's wkv state). The RWKV block is layers/blocks/residual.ResidualBlock with
LayerNorms and the channel mix as its MLP, which carries its token shift.

Initial values follow the reference (layer-dependent lerp and decay profiles,
LoRA A = 0 and B ~ U(+-0.01), ln_x scale ((layer + 1) / L)^0.7, key and gate at
a tenth of the usual scale). `layer` may be a traced index (layers built by
nnx.vmap to be scanned): the layer-dependent values are then read from the
table of every layer's, the same float32 numbers (layers/mixers/rwkv_init.per_layer). Padding (documents -1) is an identity step of the
wkv (k = 0, w = 1) and a hole for the token shift, so it disturbs no state.
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
from layers.documents import Segments
from layers.flops import Lengths, attention_flops, mean_visible_keys
from layers.mixers.rwkv_init import constant, layer_ratios, lora, lora_uniform, lora_zeros, mix_profile, per_layer
from layers.mixers.wkv import IMPLEMENTATIONS, wkv

VARIANTS = ('finch', 'finch_c2')
BRANCHES = {'finch': ('r', 'k', 'v', 'w', 'g'), 'finch_c2': ('r', 'k', 'v', 'w', 'v2')}


# ---------------------------------------------------------------------------- time-mix

@flax.struct.dataclass
class TimeMixCache:
  shift: ConvState    # the last input (token shift) and its document
  state: jax.Array    # [B, N, H, H] float32: the wkv state


def time_mix_init(dim: int, num_heads: int, head_dim: int, layer: int, num_layers: int,
                  branches: tuple[str, ...]) -> dict[str, np.ndarray]:
  """The layer-dependent initial values of a time-mix (the reference's time_maa_*, time_decay,
  time_faaaa and ln_x scale)."""
  r0, r1 = layer_ratios(layer, num_layers)
  profiles = dict(r=mix_profile(dim, 0.5 * r1), k=mix_profile(dim, r1), v=mix_profile(dim, r1, 0.3 * r0),
                  w=mix_profile(dim, r1), g=mix_profile(dim, 0.5 * r1), v2=mix_profile(dim, r1, 0.3 * r0))
  n = np.arange(dim, dtype=np.float64) / (dim - 1)
  zigzag = ((np.arange(dim) + 1) % 3 - 1) * 0.1
  return dict(mix_x=mix_profile(dim, r1), mix=np.stack([profiles[b] for b in branches]),
              decay=(-6 + 5 * n ** (0.7 + 1.3 * r0)).astype(np.float32).reshape(num_heads, head_dim),
              bonus=(r0 * (1 - n) + zigzag).astype(np.float32).reshape(num_heads, head_dim),
              ln_scale=np.float32(((layer + 1) / num_layers) ** 0.7))


class TimeMix(nnx.Module):
  """RWKV-6 time mixing (the equations above): a mixer (layers/blocks/residual.py) whose cache is the token
  shift and the per-head wkv state [B, N, H, H]."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, layer: int | jax.Array, num_layers: int,
               variant: str = 'finch_c2', mix_rank: int = 32, decay_rank: int = 64, impl: str = 'auto',
               chunk_size: int = 64, out_init_scale: float = 1.0, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if variant not in VARIANTS:
      raise ValueError(f'unknown RWKV-6 time-mix variant {variant!r}; known: {VARIANTS}')
    if impl not in IMPLEMENTATIONS:
      raise ValueError(f'unknown wkv impl {impl!r}; known: {IMPLEMENTATIONS}')
    if num_heads * head_dim != dim:
      raise ValueError(f'num_heads {num_heads} x head_dim {head_dim} must equal dim {dim}')
    self.variant, self.impl, self.chunk_size = variant, impl, chunk_size
    self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
    self.mix_rank, self.decay_rank = mix_rank, decay_rank
    self.dtype = dtype
    self.branches = BRANCHES[variant]
    init = per_layer(lambda i: time_mix_init(dim, num_heads, head_dim, i, num_layers, self.branches), layer,
                     num_layers)
    pd = param_dtype
    embed, heads = (sharding.EMBED,), (sharding.HEADS, sharding.HEAD_DIM)
    self.mix_x = constant(init['mix_x'], embed, pd)
    self.mix = constant(init['mix'], (None, sharding.EMBED), pd)
    num_branches = len(self.branches)
    self.mix_lora_a = lora_zeros((dim, num_branches, mix_rank), (sharding.EMBED, None, None), pd)
    self.mix_lora_b = lora_uniform(rngs, (num_branches, mix_rank, dim), (None, None, sharding.EMBED), pd)
    self.decay = constant(init['decay'], heads, pd)
    self.decay_lora_a = lora_zeros((dim, decay_rank), (sharding.EMBED, None), pd)
    self.decay_lora_b = lora_uniform(rngs, (decay_rank, num_heads, head_dim), (None, *heads), pd)
    common = dict(dtype=dtype, param_dtype=pd, rngs=rngs)
    names = (sharding.EMBED, *heads)
    self.receptance = Dense(dim, (num_heads, head_dim), names=names, **common)
    self.key = Dense(dim, (num_heads, head_dim), names=names, init_scale=0.01, **common)
    self.value = Dense(dim, (num_heads, head_dim), names=names, **common)
    self.output = Dense((num_heads, head_dim), dim, names=(*heads, sharding.EMBED), init_scale=out_init_scale,
                        **common)
    if variant == 'finch':
      self.bonus = constant(init['bonus'], heads, pd)
      self.gate = Dense(dim, (num_heads, head_dim), names=names, init_scale=0.01, **common)
      # GroupNorm over each head; eps as the reference's 1e-5 * head_size_divisor^2 (divisor 8).
      self.ln_x = LayerNorm((num_heads, head_dim), eps=64e-5, group_axes=1, scale_init=init['ln_scale'],
                            param_dtype=pd)
    else:
      self.value2_lora_a = lora_zeros((dim, decay_rank), (sharding.EMBED, None), pd)
      self.value2_lora_b = lora_uniform(rngs, (decay_rank, num_heads, head_dim), (None, *heads), pd)
      self.ln_x = LayerNorm((num_heads, head_dim), eps=1e-5, scale_init=init['ln_scale'], param_dtype=pd)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> TimeMixCache:
    """The token shift and the float32 wkv state: the same size whatever `max_len`."""
    del max_len
    return TimeMixCache(shift=token_shift.init_state(batch, self.dim, dtype),
                        state=jnp.zeros((batch, self.num_heads, self.head_dim, self.head_dim), jnp.float32))

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    """r, k, v, out and the gate (Finch) or W_v once more for the second value (Finch-C2, with a LoRA as
    large as the decay's); the ddlerp and decay LoRAs; the wkv in its chunked form: scores and values
    inside a chunk, the state read (r S) and update (k^T v) per token. Documents do not change the wkv's work."""
    del doc_lengths
    d, n, h = self.dim, self.num_heads, self.head_dim
    decay_loras = 1 if self.variant == 'finch' else 2
    projections = 2 * d * d * 5 + 2 * 2 * d * 5 * self.mix_rank + decay_loras * 2 * 2 * d * self.decay_rank
    chunk = min(self.chunk_size, seq_len)
    return projections + attention_flops(n, h, mean_visible_keys(chunk)) + 2 * 2 * n * h * h

  def __call__(self, x: jax.Array, segments: Segments,
               cache: TimeMixCache | None = None) -> tuple[jax.Array, TimeMixCache | None]:
    """x [B, T, D] -> y [B, T, D], updated cache."""
    documents = segments.document
    heads = (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_HEADS, None)
    x_prev, shift = token_shift.token_shift(x, documents, None if cache is None else cache.shift)
    dx = x_prev - x
    mixes = self._branch_mixes(x, dx)
    xs = {b: x + dx * mixes[i] for i, b in enumerate(self.branches)}
    constrain = lambda a: sharding.constrain(a, heads)
    r = constrain(self.receptance(xs['r']))                                 # [B, T, N, H]
    k = constrain(self.key(xs['k']))
    v = constrain(self.value(xs['v']))
    w = self.decay[...].astype(jnp.float32) + lora(xs['w'], self.decay_lora_a[...], self.decay_lora_b[...],
                                                   self.dtype).astype(jnp.float32)
    log_w = -jnp.exp(w)                                                     # [B, T, N, H] float32, <= 0
    padding = (documents < 0)[..., None, None]
    if self.variant == 'finch_c2':
      k = k * (-jnp.expm1(log_w)).astype(k.dtype)                          # k * (1 - w_t)
      u = None
    else:
      u = self.bonus[...]
    k = jnp.where(padding, 0, k)
    log_w = jnp.where(padding, 0.0, log_w)
    reset = segments.positions == 0
    y, state = wkv(r, k, v, log_w, u, reset, None if cache is None else cache.state, impl=self.impl,
                   chunk_size=self.chunk_size)
    y = constrain(y.astype(self.dtype))
    if self.variant == 'finch_c2':
      v2 = self.value(xs['v2']) + lora(xs['v2'], self.value2_lora_a[...], self.value2_lora_b[...], self.dtype)
      y = self.ln_x(y + v2)
    else:
      g = jax.nn.silu(self.gate(xs['g']))
      y = self.ln_x(y) * g
    out = self.output(constrain(y))
    return out, (None if cache is None else TimeMixCache(shift=shift, state=state))

  def _branch_mixes(self, x: jax.Array, dx: jax.Array) -> jax.Array:
    """[M, B, T, D]: mu_i + tanh(lerp(x, x_prev, mu_x) A_i) B_i for each branch i."""
    xx = x + dx * self.mix_x[...].astype(x.dtype)
    h = jnp.tanh(jnp.einsum('btd,dmr->btmr', xx.astype(self.dtype), self.mix_lora_a[...].astype(self.dtype)))
    m = jnp.einsum('btmr,mrd->mbtd', h, self.mix_lora_b[...].astype(self.dtype))
    return (self.mix[...].astype(self.dtype)[:, None, None] + m).astype(x.dtype)


# ---------------------------------------------------------------------------- channel-mix

class ChannelMix(nnx.Module):
  """RWKV-6 channel mixing, RWKV's MLP: out = sigmoid(W_r lerp_r) * W_v relu(W_k lerp_k)^2. The lerps
  reach one token back, so it follows the mixer protocol with the token shift as its cache."""

  def __init__(self, dim: int, hidden_dim: int, *, layer: int | jax.Array, num_layers: int,
               out_init_scale: float = 1.0, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    profile = per_layer(lambda i: mix_profile(dim, layer_ratios(i, num_layers)[1]), layer, num_layers)
    self.dim, self.hidden_dim = dim, hidden_dim
    self.mix_k = constant(profile, (sharding.EMBED,), param_dtype)
    self.mix_r = constant(profile, (sharding.EMBED,), param_dtype)
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.key = Dense(dim, hidden_dim, names=(sharding.EMBED, sharding.MLP), **common)
    self.value = Dense(hidden_dim, dim, names=(sharding.MLP, sharding.EMBED), init_scale=out_init_scale, **common)
    self.receptance = Dense(dim, dim, names=(sharding.EMBED, None), **common)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> ConvState:
    del max_len
    return token_shift.init_state(batch, self.dim, dtype)

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    """W_k, W_v and W_r; the same for every token."""
    del seq_len, doc_lengths
    return 2 * (2 * self.dim * self.hidden_dim + self.dim * self.dim)

  def __call__(self, x: jax.Array, segments: Segments,
               cache: ConvState | None = None) -> tuple[jax.Array, ConvState | None]:
    """x [B, T, D] -> y [B, T, D], the token-shift state after the last token."""
    x_prev, cache = token_shift.token_shift(x, segments.document, cache)
    hidden = jnp.square(jax.nn.relu(self.key(token_shift.lerp(x, x_prev, self.mix_k[...].astype(x.dtype)))))
    hidden = sharding.constrain(hidden, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_MLP))
    gate = jax.nn.sigmoid(self.receptance(token_shift.lerp(x, x_prev, self.mix_r[...].astype(x.dtype))))
    return gate * self.value(hidden), cache
