"""Griffin and Hawk (De et al. 2024, arXiv 2402.19427; RecurrentGemma).

Residual blocks (pre-norm, zero-centred RMSNorm):
    r = x + Mixer(RMSNorm(x));  out = r + GeGLU-MLP(RMSNorm(r))
where the mixer of each layer follows `block_pattern`, cycled over the layers:
  'r'  recurrent block: y = gelu(W_y x); u = RG-LRU(Conv1D(W_x x)); out = W_out(u * y)
  'a'  local MQA attention (one K/V head, RoPE on half of each head's dims,
       sliding window of `window` keys including itself, output bias)
Griffin is 'rra' (two recurrent blocks, then attention); Hawk is 'r'. Then a
final RMSNorm and logits tied to the embedding, soft-capped at `logits_soft_cap`.
Embeddings are scaled by sqrt(D) rounded to bf16 on input only (as RecurrentGemma).
Init (REFERENCES.md §2): dense layers fan-in normal (truncated, as all of
layers/linear.py) with variance scale 2 / num_layers for each block's last
projection (W_out, attention out, MLP down), conv kernel 0.01 / width,
embedding std 1/sqrt(D), RG-LRU a uniform on the ring [0.9, 0.999].

Layers are built in groups of len(block_pattern) (each group the same shape),
so `scan_layers` can run the groups with one lax.scan; the layers that do not
fill a whole group form the `tail`. Decode cache per layer: RG-LRU state
(float32) + the conv's last inputs for a recurrent block, a ring buffer of
`window` slots for attention. Parity with recurrentgemma 1.0.1 (whose window w
lets a query see w + 1 keys: ours is window = w + 1) is tested in
tests/test_griffin.py; `architectures.griffin_convert` ports its weights.
"""
import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from architectures import registry
from architectures.base import DECODE_GEMV_OPTIONS, ModelCache, ModelConfig, SequenceModel
from layers import attention_ops, sharding, stack
from layers.attention import Attention
from layers.conv1d import CausalConv1D, ConvState
from layers.documents import Cursor, Segments, locate
from layers.flops import mean_visible_keys
from layers.kv_cache import KVCache
from layers.linear import Dense
from layers.mlp import GatedMLP
from layers.norms import RMSNorm
from layers.rg_lru import IMPLEMENTATIONS as LRU_IMPLEMENTATIONS
from layers.rg_lru import RGLRU
from layers.token_io import TokenIO

RECURRENT, ATTENTION = 'r', 'a'


@dataclasses.dataclass(frozen=True)
class GriffinConfig(ModelConfig):
  runtime_fields: ClassVar[tuple[str, ...]] = ('dtype', 'attention_impl', 'remat', 'lru_impl', 'lru_chunk_size')

  vocab_size: int = 384
  num_layers: int = 3
  dim: int = 64
  num_heads: int = 4            # attention heads (head_dim = dim / num_heads) and RG-LRU gate blocks
  lru_width: int = 0            # 0: = dim
  mlp_dim: int = 0              # 0: = 3 * dim
  block_pattern: str = 'rra'    # cycled over the layers: r = recurrent, a = local attention; Hawk: 'r'
  window: int = 2049            # keys a query sees, itself included (recurrentgemma's 2048 + 1); 0: global
  conv_width: int = 4
  lru_c: float = 8.0
  lru_min_rad: float = 0.9
  lru_max_rad: float = 0.999
  lru_impl: str = 'auto'        # 'fused' (GPU kernel) | 'sequential' | 'associative' | 'chunked' | 'pallas' | 'auto'
  lru_chunk_size: int = 128
  rope_base: float = 10000.0
  rope_fraction: float = 0.5    # RecurrentGemma rotates the first half of each head's dims
  tie_embeddings: bool = True
  scale_embeddings: bool = True  # x = E[token] * sqrt(D) (False in the paper's 7B models)
  round_embed_scale: bool = True  # sqrt(D) rounded to bfloat16 whatever the compute dtype (RecurrentGemma)
  logits_soft_cap: float = 30.0  # 0: none
  norm_eps: float = 1e-6
  attention_impl: str = 'auto'
  dtype: str = 'bfloat16'
  param_dtype: str = 'float32'
  scan_layers: bool = False     # True: one lax.scan over the groups of len(block_pattern) layers
  remat: str = 'none'

  def __post_init__(self):
    self.check_positive('vocab_size', 'num_layers', 'dim', 'num_heads', 'conv_width', 'lru_chunk_size')
    for field in ('lru_width', 'mlp_dim', 'window'):
      self.check(getattr(self, field) >= 0, field, 'must be >= 0 (0 = the default)')
    self.check(self.dim % self.num_heads == 0, 'num_heads', f'does not divide config.model.dim={self.dim}')
    self.check(self.lru % self.num_heads == 0, 'num_heads',
               f'does not divide config.model.lru_width={self.lru} (the RG-LRU gates have num_heads blocks)')
    self.check(bool(self.block_pattern) and set(self.block_pattern) <= {RECURRENT, ATTENTION}, 'block_pattern',
               "must be a non-empty string of 'r' (recurrent) and 'a' (attention), e.g. 'rra' (Griffin), 'r' (Hawk)")
    self.check(self.lru_c > 0, 'lru_c', 'must be positive')
    self.check(0 < self.lru_min_rad < 1, 'lru_min_rad', 'must be in (0, 1)')
    self.check(self.lru_min_rad < self.lru_max_rad < 1, 'lru_max_rad',
               f'must be in (config.model.lru_min_rad={self.lru_min_rad}, 1)')
    self.check(self.lru_impl in LRU_IMPLEMENTATIONS, 'lru_impl', f'known: {LRU_IMPLEMENTATIONS}')
    self.check(self.logits_soft_cap >= 0, 'logits_soft_cap', 'must be >= 0 (0 = none)')
    self.check(self.attention_impl in attention_ops.IMPLEMENTATIONS, 'attention_impl',
               f'known: {attention_ops.IMPLEMENTATIONS}')
    self.check(self.remat in stack.REMAT_POLICIES, 'remat', f'known: {sorted(stack.REMAT_POLICIES)}')
    self.check_dtype('dtype')
    self.check_dtype('param_dtype')
    rotated = int(self.head_dim * self.rope_fraction)
    self.check(rotated > 0 and rotated % 2 == 0, 'rope_fraction',
               f'gives {rotated} rotated channels of head_dim {self.head_dim}; must be even and > 0')

  @property
  def lru(self) -> int:
    return self.lru_width or self.dim

  @property
  def mlp(self) -> int:
    return self.mlp_dim or 3 * self.dim

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def block_types(self) -> str:
    """The mixer of every layer, e.g. 'rrarrarr' for 8 Griffin layers."""
    pattern = self.block_pattern
    return (pattern * (self.num_layers // len(pattern) + 1))[:self.num_layers]

  @property
  def embed_scale(self) -> float | None:
    if not self.scale_embeddings:
      return None
    scale = np.float32(self.dim ** 0.5)
    return float(scale.astype(jnp.bfloat16) if self.round_embed_scale else scale)


@flax.struct.dataclass
class RecurrentCache:
  lru: jax.Array     # [B, lru] float32: RG-LRU state
  conv: ConvState    # the conv's last conv_width - 1 inputs and their documents


class RecurrentBlock(nnx.Module):
  """Griffin's recurrent mixer: W_out(RG-LRU(Conv1D(W_x x)) * gelu(W_y x)); dense layers with bias.

  W_x and W_y are one [D, 2, lru] kernel (`linear_in`): one matmul, and fewer parameter leaves.
  """

  def __init__(self, cfg: GriffinConfig, rngs: nnx.Rngs):
    dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    common = dict(use_bias=True, rngs=rngs, **dtypes)
    self.linear_in = Dense(cfg.dim, (2, cfg.lru), names=(sharding.EMBED, None, sharding.LRU), **common)  # [x, y]
    self.linear_out = Dense(cfg.lru, cfg.dim, names=(sharding.LRU, sharding.EMBED),
                            init_scale=2.0 / cfg.num_layers, **common)
    self.conv = CausalConv1D(cfg.lru, cfg.conv_width, rngs=rngs, **dtypes)
    self.lru = RGLRU(cfg.lru, cfg.num_heads, c=cfg.lru_c, min_rad=cfg.lru_min_rad, max_rad=cfg.lru_max_rad,
                     impl=cfg.lru_impl, chunk_size=cfg.lru_chunk_size, rngs=rngs, **dtypes)

  def __call__(self, x, positions, documents, cache: RecurrentCache | None):
    """x [B, T, D] -> [B, T, D], updated cache."""
    branches = self.linear_in(x)  # [B, T, 2, lru]
    y = jax.nn.gelu(branches[..., 1, :], approximate=True)
    u, conv_state = self.conv(branches[..., 0, :], documents, None if cache is None else cache.conv)
    u, lru_state = self.lru(u, positions, None if cache is None else cache.lru)
    out = self.linear_out(u * y)
    return out, (None if cache is None else RecurrentCache(lru=lru_state, conv=conv_state))


class ResidualBlock(nnx.Module):
  """r = x + Mixer(RMSNorm(x)); out = r + MLP(RMSNorm(r)), the mixer recurrent or local attention."""

  def __init__(self, cfg: GriffinConfig, kind: str, rngs: nnx.Rngs):
    dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    out_scale = 2.0 / cfg.num_layers
    self.kind = kind
    norm = dict(eps=cfg.norm_eps, zero_centered=True, param_dtype=dtypes['param_dtype'])
    self.temporal_norm = RMSNorm(cfg.dim, **norm)
    if kind == RECURRENT:
      self.recurrent = RecurrentBlock(cfg, rngs)
    else:
      self.attention = Attention(
          cfg.dim, cfg.num_heads, 1, cfg.head_dim, window=cfg.window or None, rope_base=cfg.rope_base,
          rope_style='standard', rope_fraction=cfg.rope_fraction, impl=cfg.attention_impl,
          out_init_scale=out_scale, out_bias=True, rngs=rngs, **dtypes)
    self.mlp_norm = RMSNorm(cfg.dim, **norm)
    self.mlp = GatedMLP(cfg.dim, cfg.mlp, activation='gelu', use_bias=True, out_init_scale=out_scale,
                        rngs=rngs, **dtypes)

  def __call__(self, x, positions, token_index, documents, cache):
    h = self.temporal_norm(x)
    if self.kind == RECURRENT:
      mixed, cache = self.recurrent(h, positions, documents, cache)
    else:
      mixed, cache = self.attention(h, Segments(positions, token_index, documents), cache)
    x = x + mixed
    x = x + self.mlp(self.mlp_norm(x))
    return sharding.constrain(x, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED)), cache


class BlockGroup(nnx.Module):
  """Consecutive residual blocks, one per letter of `kinds` (one period of the block pattern)."""

  def __init__(self, cfg: GriffinConfig, kinds: str, rngs: nnx.Rngs):
    self.blocks = nnx.List([ResidualBlock(cfg, kind, rngs) for kind in kinds])

  def __call__(self, x, positions, token_index, documents, caches):
    new_caches = []
    for i, block in enumerate(self.blocks):
      x, cache = block(x, positions, token_index, documents, None if caches is None else caches[i])
      new_caches.append(cache)
    return x, (None if caches is None else tuple(new_caches))


@registry.register('griffin')
class Griffin(SequenceModel):
  Config = GriffinConfig
  decode_compiler_options = DECODE_GEMV_OPTIONS

  def __init__(self, config: GriffinConfig, *, rngs: nnx.Rngs):
    self.config = cfg = config
    dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.io = TokenIO(cfg.vocab_size, cfg.dim, tie_embeddings=cfg.tie_embeddings, scale_embeddings=False,
                      logits_soft_cap=cfg.logits_soft_cap, embed_init_std=cfg.dim ** -0.5, rngs=rngs, **dtypes)
    num_groups, tail = divmod(cfg.num_layers, len(cfg.block_pattern))
    self.groups = stack.create_layers(lambda r: BlockGroup(cfg, cfg.block_pattern, r), num_groups, rngs,
                                      scan=cfg.scan_layers and num_groups > 0)
    self.tail = stack.create_layers(lambda r: BlockGroup(cfg, cfg.block_pattern[:tail], r), int(tail > 0), rngs,
                                    scan=False)
    self.final_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, zero_centered=True, param_dtype=dtypes['param_dtype'])

  @property
  def num_groups(self) -> int:
    return self.config.num_layers // len(self.config.block_pattern)

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: ModelCache | None = None, *,
               last_only: bool = False, capped: bool = True) -> tuple[jax.Array, ModelCache | None]:
    cfg = self.config
    segments, cursor = locate(positions, None if cache is None else cache.cursor)
    token_index, documents = segments.index, segments.document
    x = self.io.embed_tokens(tokens)  # [B, T, D]
    if cfg.embed_scale is not None:
      x = x * jnp.asarray(cfg.embed_scale, x.dtype)

    def group_fn(group: BlockGroup, h, group_cache):
      return group(h, positions, token_index, documents, group_cache)

    caches = None if cache is None else cache.layers
    group_caches = tail_caches = None
    if self.num_groups:
      x, group_caches = stack.apply_layers(self.groups, x, None if caches is None else caches['groups'], group_fn,
                                           scan=cfg.scan_layers, remat=cfg.remat)
    if len(self.tail):
      x, tail_caches = stack.apply_layers(self.tail, x, None if caches is None else caches['tail'], group_fn,
                                          scan=False, remat=cfg.remat)
    if last_only:
      x = x[:, -1:]
    logits = self.io.logits(self.final_norm(x), capped)  # [B, T or 1, V]
    if cache is None:
      return logits, None
    return logits, cache.replace(cursor=cursor, layers=dict(groups=group_caches, tail=tail_caches))

  def _block_cache(self, kind: str, batch: int, max_len: int, dtype: jnp.dtype):
    cfg = self.config
    if kind == RECURRENT:
      return RecurrentCache(lru=jnp.zeros((batch, cfg.lru), jnp.float32),
                            conv=ConvState.create(batch, cfg.conv_width, cfg.lru, dtype))
    slots = max_len if not cfg.window else min(cfg.window, max_len)
    return KVCache.create(batch, slots, 1, cfg.head_dim, dtype)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype = jnp.bfloat16) -> ModelCache:
    cfg = self.config
    pattern = cfg.block_pattern
    one_group = tuple(self._block_cache(kind, batch, max_len, dtype) for kind in pattern)
    groups = None
    if self.num_groups:
      groups = (stack.stack_caches(one_group, self.num_groups) if cfg.scan_layers
                else [one_group] * self.num_groups)
    tail = [one_group[:len(self.tail[0].blocks)]] if len(self.tail) else None
    return ModelCache(cursor=Cursor.create(batch), layers=dict(groups=groups, tail=tail), max_len=max_len)

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token: 2 x every matmul weight, plus attention over its visible keys.

    Also counted, though not matmuls: the block-diagonal RG-LRU gates as the
    matmuls they are (2 x 2 x lru x lru / num_heads), the conv's multiply-adds
    (2 x conv_width x lru) and the recurrence's multiply-add (2 x lru). Not
    counted: sigmoid/softplus/exp/sqrt, norms, GELU, soft cap, embedding lookup.
    """
    cfg = self.config
    d, lru, m, n, h = cfg.dim, cfg.lru, cfg.mlp, cfg.num_heads, cfg.head_dim
    mlp = 2 * 3 * d * m
    recurrent = 2 * 3 * d * lru + 2 * 2 * lru * (lru // n) + 2 * cfg.conv_width * lru + 2 * lru
    attention = 2 * (2 * d * n * h + 2 * d * h) + 2 * 2 * n * h * mean_visible_keys(seq_len, cfg.window)
    kinds = cfg.block_types
    total = kinds.count(RECURRENT) * recurrent + kinds.count(ATTENTION) * attention + cfg.num_layers * mlp
    return total + 2 * d * cfg.vocab_size
