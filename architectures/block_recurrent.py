"""Block-Recurrent Transformer (Hutchins et al. 2022, arXiv 2203.07852; REFERENCES.md §3).

Pre-norm layers (the Transformer baseline's shape) whose attention is windowed: each window of
`window` tokens attends to itself and the previous window, whose keys and values come from a
Transformer-XL cache (layers/windowed_attention.py). The layers at `recurrent_layers` (default: the
third from the top, meliad's -3) also carry `num_states` state vectors through the block-recurrent
cell (layers/block_recurrent.py):
    a = [SelfAttention(RMSNorm(x)) | ReadState(RMSNorm(x))]   (the second part in recurrent layers)
    h = x + W_o a;   out = h + GatedMLP(RMSNorm(h))
then a final RMSNorm and the logits. Every layer's decode cache is a ring of the last window's keys
(two windows with window_span='block'); a recurrent layer's also holds its state (float32) and the
document the state belongs to. A call continues the sequence from any cache: windows are aligned
to token indices, the state advances at every window boundary the call crosses, also when decoding
token by token, and a long-document stream (config.streaming) carries the cache between segments.
"""
import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from architectures import registry
from architectures.base import AttentionHeads, ModelCache, ModelConfig, SequenceModel
from layers import sharding, stack
from layers.block_recurrent import GATES, VARIANTS, BlockRecurrentCell, RecurrentState
from layers.documents import Cursor, locate
from layers.kv_cache import KVCache
from layers.linear import Dense
from layers.mlp import ACTIVATIONS, GatedMLP
from layers.norms import RMSNorm
from layers.token_io import TokenIO
from layers.windowed_attention import POSITIONS, SPANS, Layout, WindowedAttention, layout_keys


@dataclasses.dataclass(frozen=True)
class BlockRecurrentConfig(AttentionHeads, ModelConfig):
  vocab_size: int = 384
  num_layers: int = 3
  dim: int = 64
  num_heads: int = 4
  num_kv_heads: int = 0          # 0: = num_heads
  head_dim: int = 0              # 0: = dim // num_heads
  mlp_dim: int = 256             # token FFN, and the state FFN of the 'single' / 'dual' variants
  mlp_activation: str = 'silu'
  window: int = 8                # W: tokens per window (the recurrent cell's block)
  window_span: str = 'sliding'   # 'sliding': the last W keys; 'block': previous window + current up to itself
  num_states: int = 8            # S state vectors in each recurrent layer
  recurrent_layers: tuple = (-3,)  # layer indices (negative: from the top) with a recurrent cell
  gate: str = 'fixed'            # 'fixed' (meliad 'bias') or 'lstm'
  variant: str = 'skip'          # 'skip' (no state FFN), 'single' (one gate), 'dual' (two gates)
  state_reads_previous_window: bool = False  # meliad: the state also reads the previous window's tokens
  tie_state_kv: bool = False     # True: states use the tokens' K/V projections; False: their own (meliad)
  position: str = 'rope'         # 'rope', 't5' (meliad: T5 relative bias), 'none'
  rope_base: float = 10000.0
  qk_norm: bool = False          # meliad: L2-normalised q/k, learned per-head scale
  t5_buckets: int = 32
  t5_max_distance: int = 128
  tie_embeddings: bool = False
  logits_soft_cap: float = 0.0
  norm_eps: float = 1e-6
  dtype: str = 'bfloat16'
  param_dtype: str = 'float32'
  remat: str = 'none'

  def __post_init__(self):
    layers = self.recurrent_layers
    object.__setattr__(self, 'recurrent_layers', (layers,) if isinstance(layers, int) else tuple(layers))
    self.check_positive('vocab_size', 'num_layers', 'dim', 'num_heads', 'mlp_dim', 'window', 'num_states')
    self.check_heads()
    self.check(all(isinstance(i, int) and -self.num_layers <= i < self.num_layers for i in self.recurrent_layers),
               'recurrent_layers', f'indices must lie in [-{self.num_layers}, {self.num_layers}) '
               f'(config.model.num_layers={self.num_layers})')
    self.check(len(set(self.recurrent_indices)) == len(self.recurrent_layers), 'recurrent_layers',
               'names a layer twice')
    self.check(self.window_span in SPANS, 'window_span', f'known: {SPANS}')
    self.check(self.gate in GATES, 'gate', f'known: {GATES}')
    self.check(self.variant in VARIANTS, 'variant', f'known: {VARIANTS}')
    self.check(self.position in POSITIONS, 'position', f'known: {POSITIONS}')
    if self.position == 'rope':
      self.check(self.heads_dim % 2 == 0, 'head_dim', 'RoPE needs an even head dimension')
    if self.position == 't5':
      self.check(self.t5_buckets >= 2 and self.t5_buckets % 2 == 0, 't5_buckets', 'must be even and >= 2')
      self.check(self.t5_max_distance > self.t5_buckets // 2, 't5_max_distance',
                 f'must exceed config.model.t5_buckets / 2 = {self.t5_buckets // 2}')
    self.check(self.logits_soft_cap >= 0, 'logits_soft_cap', 'must be >= 0 (0 = none)')
    self.check(self.mlp_activation in ACTIVATIONS, 'mlp_activation', f'known: {sorted(ACTIVATIONS)}')
    self.check(self.remat in stack.REMAT_POLICIES, 'remat', f'known: {sorted(stack.REMAT_POLICIES)}')
    self.check_dtype('dtype')
    self.check_dtype('param_dtype')

  @property
  def recurrent_indices(self) -> tuple[int, ...]:
    return tuple(sorted(i % self.num_layers for i in self.recurrent_layers))


@flax.struct.dataclass
class RecurrentLayerCache:
  kv: KVCache
  recurrent: RecurrentState


class Layer(nnx.Module):
  """One pre-norm layer: windowed attention (and, if recurrent, the state read) then gated MLP."""

  def __init__(self, cfg: BlockRecurrentConfig, recurrent: bool, rngs: nnx.Rngs):
    dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    out_scale = 1.0 / (2 * cfg.num_layers)
    n, h = cfg.num_heads, cfg.heads_dim
    self.window, self.recurrent = cfg.window, recurrent
    self.keep_previous_window = recurrent and cfg.state_reads_previous_window
    self.attention_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])
    self.attention = WindowedAttention(
        cfg.dim, n, cfg.kv_heads, h, window=cfg.window, span=cfg.window_span, position=cfg.position,
        qk_norm=cfg.qk_norm, rope_base=cfg.rope_base, num_buckets=cfg.t5_buckets,
        max_distance=cfg.t5_max_distance, cross_query=recurrent, rngs=rngs, **dtypes)
    self.cell = BlockRecurrentCell(
        cfg.dim, n, cfg.kv_heads, h, window=cfg.window, num_states=cfg.num_states, gate=cfg.gate,
        variant=cfg.variant, mlp_dim=cfg.mlp_dim, mlp_activation=cfg.mlp_activation, qk_norm=cfg.qk_norm,
        read_previous_window=cfg.state_reads_previous_window, norm_eps=cfg.norm_eps, rngs=rngs,
        token_kv=(self.attention.key, self.attention.value) if cfg.tie_state_kv else None,
        **dtypes) if recurrent else None
    in_shape, in_names = ((2, n, h), (None, sharding.HEADS, sharding.HEAD_DIM)) if recurrent else (
        (n, h), (sharding.HEADS, sharding.HEAD_DIM))
    self.out = Dense(in_shape, cfg.dim, names=(*in_names, sharding.EMBED), init_scale=out_scale, rngs=rngs, **dtypes)
    self.mlp_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])
    self.mlp = GatedMLP(cfg.dim, cfg.mlp_dim, activation=cfg.mlp_activation, out_init_scale=out_scale,
                        rngs=rngs, **dtypes)
    self.num_states, self.dim = cfg.num_states, cfg.dim

  def init_cache(self, batch: int, dtype: jnp.dtype) -> Any:
    kv = self.attention.init_cache(batch, dtype, self.keep_previous_window)
    if not self.recurrent:
      return kv
    return RecurrentLayerCache(kv=kv, recurrent=self.new_state(batch, dtype))

  def new_state(self, batch: int, dtype: jnp.dtype) -> RecurrentState:
    return RecurrentState.create(batch, self.num_states, self.dim, self.attention.num_kv_heads,
                                 self.attention.head_dim, dtype)

  def __call__(self, x, positions, token_index, documents, cache):
    """x [B, T, D] -> [B, T, D], updated cache (None without one)."""
    batch, length = x.shape[:2]
    kv_cache = cache.kv if self.recurrent and cache is not None else cache
    q, k, v, q2 = self.attention.project(self.attention_norm(x), positions)
    carry = None
    if self.recurrent:
      carry = cache.recurrent if cache is not None else self.new_state(batch, k.dtype)
    if kv_cache is None or length >= self.window:  # blocked: whole windows, the state scanned over them
      layout = Layout.build(token_index, self.window, cached=kv_cache is not None)
      keys = layout_keys(layout, k, v, documents, kv_cache)
      attended = layout.take(self.attention.blocked(layout, layout.place(q), keys))
      if self.recurrent:
        read, carry = self.cell.blocked(layout, layout.place(q2), keys, carry, self.attention.cross_scale())
        attended = jnp.stack([attended, layout.take(read)], axis=2)
    else:  # flat: a few new tokens against the cache (decoding)
      attended, all_k, all_v, k_index, k_document = self.attention.flat(q, k, v, token_index, documents, kv_cache)
      if self.recurrent:
        read, carry = self.cell.flat(q2, token_index, documents, all_k, all_v, k_index, k_document, carry,
                                     self.attention.cross_scale())
        attended = jnp.stack([attended, read], axis=2)
    x = x + self.out(attended)
    x = x + self.mlp(self.mlp_norm(x))
    x = sharding.constrain(x, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED))
    if cache is None:
      return x, None
    kv_cache = kv_cache.write(k, v, token_index, documents)
    return x, (RecurrentLayerCache(kv=kv_cache, recurrent=carry) if self.recurrent else kv_cache)


@registry.register('block_recurrent')
class BlockRecurrentTransformer(SequenceModel):
  Config = BlockRecurrentConfig
  left_padding_invariant = False  # windows are aligned to the row's token index

  def __init__(self, config: BlockRecurrentConfig, *, rngs: nnx.Rngs):
    self.config = config
    cfg = config
    dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.io = TokenIO(cfg.vocab_size, cfg.dim, tie_embeddings=cfg.tie_embeddings,
                      logits_soft_cap=cfg.logits_soft_cap, rngs=rngs, **dtypes)
    recurrent = set(cfg.recurrent_indices)
    self.layers = nnx.List([Layer(cfg, i in recurrent, rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=dtypes['param_dtype'])

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: ModelCache | None = None, *,
               last_only: bool = False, capped: bool = True) -> tuple[jax.Array, ModelCache | None]:
    segments, cursor = locate(positions, None if cache is None else cache.cursor)
    token_index, documents = segments.index, segments.document
    x = self.io.embed_tokens(tokens)  # [B, T, D]

    def layer_fn(layer: Layer, h, layer_cache):
      return layer(h, positions, token_index, documents, layer_cache)

    x, layer_caches = stack.apply_layers(self.layers, x, None if cache is None else cache.layers, layer_fn,
                                         scan=False, remat=self.config.remat)
    if last_only:
      x = x[:, -1:]
    logits = self.io.logits(self.final_norm(x), capped)
    return logits, (None if cache is None else cache.replace(cursor=cursor, layers=layer_caches))

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype = jnp.bfloat16) -> ModelCache:
    """Fixed size whatever `max_len`: the last window(s) of keys per layer and the recurrent states."""
    return ModelCache(cursor=Cursor.create(batch), layers=[layer.init_cache(batch, dtype) for layer in self.layers],
                      max_len=max_len)

  def flops_per_token(self, seq_len: int) -> float:
    cfg = self.config
    d, n, k, h, m, w, s = (cfg.dim, cfg.num_heads, cfg.kv_heads, cfg.heads_dim, cfg.mlp_dim, cfg.window,
                           cfg.num_states)
    position = np.arange(seq_len)
    if cfg.window_span == 'sliding':
      keys = np.minimum(position + 1, w).mean()
    else:
      keys = np.minimum(position + 1, position % w + 1 + w).mean()
    layer = 2 * d * (2 * n * h + 2 * k * h) + 2 * 3 * d * m + 2 * 2 * n * h * keys
    # Recurrent layer: the tokens' second query, the wider output projection and the state read;
    # the state side once per window (projections, its two attentions, output, FFN and gates).
    read_keys = w * (2 if cfg.state_reads_previous_window else 1)
    state = 2 * d * (2 * n * h + 2 * k * h) + 2 * 2 * n * h * (s + read_keys)  # tied K/V: same FLOPs
    gate_in = {'skip': [2 * n * h], 'dual': [2 * n * h, m], 'single': [m]}[cfg.variant]
    state += {'skip': 2 * 2 * n * h * d, 'dual': 2 * 2 * n * h * d + 2 * 3 * d * m,
              'single': 2 * 2 * (2 * n * h) * m + 2 * m * d}[cfg.variant]
    if cfg.gate == 'lstm':
      state += sum(2 * 2 * g * d for g in gate_in)
    recurrent = 2 * d * n * h + 2 * n * h * d + 2 * 2 * n * h * s + s * state / w
    return cfg.num_layers * layer + len(cfg.recurrent_layers) * recurrent + 2 * d * cfg.vocab_size
