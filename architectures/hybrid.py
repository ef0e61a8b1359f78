"""Hybrids: a decoder whose layers follow a pattern of mixers, `config.model.layers` (docs/architectures.md, Hybrid).

    layers = 'rg_lru,rg_lru,local_attention'          Griffin's block, three layers
    layers = '(rg_lru*2,local_attention)*4'           twelve layers, the block four times
    layers = 'gated_retention*6,cross_attention*6'    YOCO
    layers = 'wkv6*5,gold*3'                          GoldFinch

The grammar: items separated by commas; an item is a mixer name or a parenthesised pattern, either followed by
`*N` to repeat it N times. The mixers and their config blocks (`config.model.<block>`, e.g.
`rg_lru=dict(width=256)`) are architectures/hybrid_mixers.py's. Every layer is the pre-norm residual block
(layers/blocks/residual.py) of its mixer and the model's MLP (`mlp`: SwiGLU, GeGLU or RWKV's channel mix):

    x = embed(tokens)                         (`scale_embeddings`: times sqrt(D); `embed_norm`: then a norm)
    x = x + Mixer_i(norm(x));  x = x + MLP(norm(x))        for each layer i
    logits = io.logits(norm(x))

Readers (cross_attention, gold) read the keys of a shared-keys stage (architectures/shared_stages.py) built
once per call from the output of the layers before them, as YOCO's cross-decoder and GoldFinch's GOLD layers
do: they come last, after at least one other layer, and are all of one kind (one stage per model).

The layers before the readers are built in groups of the pattern's shortest period (layers/blocks/stack.py,
create_groups: 'rg_lru,rg_lru,local_attention' repeated 4 times is 4 groups of 3), so `scan_layers` runs the
groups in one lax.scan, as Griffin's; the readers are alike and scan as a stack. The decode cache is every
layer's own (RG-LRU and conv states, K/V rings, wkv states, ...) plus the stage's (YOCO's one K/V, GOLD's
compressed keys); the early exit of a prefill runs the readers over the last `reader_window()` positions.
"""
import dataclasses
import functools
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from architectures import registry
from architectures.base import ConfigError
from architectures.decoder import NORMS, Call, Decoder, DecoderConfig
from architectures.hybrid_mixers import BLOCKS, CHECKS, MIXERS, Block
from architectures.shared_stages import CompressedKeys, SharedKV
from layers import sharding
from layers.blocks import stack
from layers.blocks.mlp import GatedMLP
from layers.blocks.residual import ResidualBlock
from layers.blocks.shared_keys import SharedKeys
from layers.mixers.rwkv6 import ChannelMix

# config.model.mlp -> the gated MLP's activation (None: RWKV's channel mix, whose token shift is a cache).
MLPS = {'swiglu': 'silu', 'geglu': 'gelu', 'channel_mix': None}
GRAMMAR = "comma-separated mixers or '(...)' groups, each repeated N times by '*N', e.g. '(rg_lru*2,attention)*4'"


def parse_layers(text: str) -> tuple[str, ...]:
  """'(rg_lru*2,local_attention)*2' -> the name of every layer's mixer; ValueError saying what is wrong."""
  tokens = re.findall(r'[A-Za-z_]\w*|\d+|\S', text)
  position = 0

  def take() -> str | None:
    nonlocal position
    position += 1
    return tokens[position - 1] if position <= len(tokens) else None

  def sequence() -> list[str]:
    names = item()
    while position < len(tokens) and tokens[position] == ',':
      take()
      names += item()
    return names

  def item() -> list[str]:
    token = take()
    if token == '(':
      names = sequence()
      if take() != ')':
        raise ValueError("a '(' is not closed")
    elif token and re.fullmatch(r'[A-Za-z_]\w*', token):
      names = [token]
    else:
      raise ValueError(f'expected a mixer name or a group at {token or "the end"!r}')
    if position < len(tokens) and tokens[position] == '*':
      take()
      count = take()
      if not count or not count.isdigit() or int(count) < 1:
        raise ValueError(f"'*' must be followed by a count >= 1, not {count or 'the end'!r}")
      names = names * int(count)
    return names

  names = sequence()
  if position < len(tokens):
    raise ValueError(f'unexpected {tokens[position]!r}')
  return tuple(names)


def settings(name: str, defaults: dict[str, Any], given: Any) -> FrozenDict:
  """config.model.<name>: the defaults with the keys given, each of its default's type (ints for floats)."""
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ConfigError(f'config.model.{name} has unknown keys {unknown}; known: {sorted(defaults)}')
  for key, value in given.items():
    default = defaults[key]
    if isinstance(default, bool) or isinstance(value, bool):
      fits = type(value) is type(default)
    else:
      fits = isinstance(value, (int, float) if isinstance(default, float) else type(default))
    if not fits:
      raise ConfigError(f'config.model.{name}.{key}={value!r}: must be of type {type(default).__name__}')
  return FrozenDict({**defaults, **given})


def shortest_period(kinds: tuple[str, ...]) -> tuple[str, ...]:
  """The shortest prefix p of `kinds` that, cycled, gives `kinds` (whole periods, then part of one)."""
  return next(kinds[:p] for p in range(1, len(kinds) + 1) if all(k == kinds[i % p] for i, k in enumerate(kinds)))


@dataclasses.dataclass(frozen=True)
class HybridConfig(DecoderConfig):
  """The pattern, the parts around the mixers, and one block of settings per mixer (hybrid_mixers.BLOCKS)."""
  runtime_fields: ClassVar[tuple[str, ...]] = (
      *DecoderConfig.runtime_fields, 'rg_lru.impl', 'rg_lru.chunk_size', 'wkv6.impl', 'wkv6.chunk_size',
      'gated_retention.chunk_size', 'aaren.impl', 'aaren.chunk_size')

  layers: str = 'rg_lru,rg_lru,local_attention'
  num_layers: int = 0            # set from `layers` (0, or the pattern's length)
  norm: str = 'rms'              # decoder.NORMS: the blocks', the final and the stage's norm
  mlp: str = 'swiglu'            # MLPS: 'swiglu', 'geglu' (RecurrentGemma's) or 'channel_mix' (RWKV's)
  mlp_bias: bool = False         # biases in the gated MLP (RecurrentGemma's)
  scale_embeddings: bool = False  # x = E[token] * sqrt(D) (Griffin, YOCO)
  round_embed_scale: bool = False  # sqrt(D) rounded to bfloat16 first (RecurrentGemma)
  embed_norm: bool = False       # x = norm(E[token]) (RWKV's LN0; GOLD's value source)
  attention: FrozenDict = FrozenDict()
  local_attention: FrozenDict = FrozenDict()
  rg_lru: FrozenDict = FrozenDict()
  gated_retention: FrozenDict = FrozenDict()
  wkv6: FrozenDict = FrozenDict()
  aaren: FrozenDict = FrozenDict()
  block_recurrent: FrozenDict = FrozenDict()
  cross_attention: FrozenDict = FrozenDict()
  gold: FrozenDict = FrozenDict()

  def __post_init__(self):
    try:
      kinds = parse_layers(self.layers)
    except ValueError as e:
      raise self.pattern_error(f'{e}; a pattern is {GRAMMAR}') from None
    unknown = sorted(set(kinds) - set(MIXERS))
    if unknown:
      raise self.pattern_error(f'unknown mixer {unknown[0]!r}; known: {sorted(MIXERS)}')
    self.check(self.num_layers in (0, len(kinds)), 'num_layers',
               f'must be 0 or the {len(kinds)} layers of config.model.layers={self.layers!r}')
    object.__setattr__(self, 'num_layers', len(kinds))
    for name, defaults in BLOCKS.items():
      object.__setattr__(self, name, settings(name, defaults, getattr(self, name)))
    super().__post_init__()
    self.check(self.norm in NORMS, 'norm', f'known: {sorted(NORMS)}')
    self.check(self.mlp in MLPS, 'mlp', f'known: {tuple(MLPS)}')
    self.check(not self.mlp_bias or self.mlp != 'channel_mix', 'mlp_bias', 'the channel mix has no biases')
    self.check_positive('mlp_dim')
    self.check_pattern(kinds)
    for block in sorted({MIXERS[kind].block for kind in kinds}):
      CHECKS[block](Block(self, block))

  def pattern_error(self, message: str) -> ConfigError:
    return ConfigError(f'config.model.layers={self.layers!r}: {message}')

  def check_pattern(self, kinds: tuple[str, ...]) -> None:
    """Readers last, after at least one other layer, all of one kind (one shared-keys stage)."""
    readers = [i for i, kind in enumerate(kinds) if MIXERS[kind].stage]
    if not readers:
      return
    first = readers[0]
    if first == 0:
      raise self.pattern_error(f'{kinds[0]} reads the shared keys of the layers before it, and there are none; '
                               'put a layer of another mixer first')
    late = [i for i in range(first, len(kinds)) if i not in readers]
    if late:
      known = ', '.join(k for k in MIXERS if MIXERS[k].stage)
      raise self.pattern_error(f'{kinds[late[0]]} (layer {late[0]}) follows {kinds[first]} (layer {first}): the '
                               f'layers that read shared keys ({known}) come last')
    kinds_read = sorted({kinds[i] for i in readers})
    if len(kinds_read) > 1:
      raise self.pattern_error(f'{" and ".join(kinds_read)} read different shared-keys stages; a model has one')

  @property
  def kinds(self) -> tuple[str, ...]:
    """Every layer's mixer."""
    return parse_layers(self.layers)

  @property
  def writers(self) -> tuple[str, ...]:
    """The layers before the readers (every layer without readers)."""
    return tuple(kind for kind in self.kinds if not MIXERS[kind].stage)

  @property
  def readers(self) -> tuple[str, ...]:
    """The layers reading the shared-keys stage, the last ones."""
    return self.kinds[len(self.writers):]

  @property
  def mlp_activation(self) -> str:
    """The gated MLPs' activation (and the block-recurrent state FFN's): SiLU beside RWKV's channel mix."""
    return MLPS[self.mlp] or 'silu'

  def block(self, kind: str) -> Block:
    """The config block of mixer `kind`."""
    return Block(self, MIXERS[kind].block)


def make_mlp(cfg: HybridConfig, layer: int | jax.Array, rngs: nnx.Rngs) -> nnx.Module:
  """The block's MLP of width mlp_dim: gated (SwiGLU, GeGLU) or RWKV's channel mix."""
  if cfg.mlp == 'channel_mix':
    return ChannelMix(cfg.dim, cfg.mlp_dim, layer=layer, num_layers=cfg.num_layers,
                      out_init_scale=cfg.residual_init_scale, rngs=rngs, **cfg.dtypes)
  return GatedMLP(cfg.dim, cfg.mlp_dim, activation=cfg.mlp_activation, use_bias=cfg.mlp_bias,
                  out_init_scale=cfg.residual_init_scale, rngs=rngs, **cfg.dtypes)


@registry.register('hybrid')
class Hybrid(SharedKV, CompressedKeys, Decoder):
  """The generic decoder over the groups of the writers' pattern and its tail, then, where the pattern has
  readers, the shared-keys stage they read and the readers (the module docstring)."""

  Config = HybridConfig
  stacks = ('groups', 'tail')
  reader_stacks = ('readers',)

  def __init__(self, config: HybridConfig, *, rngs: nnx.Rngs):
    self.config = cfg = config
    self.io = cfg.make_io(rngs, scale_embeddings=cfg.scale_embeddings,
                          round_scale_to=jnp.bfloat16 if cfg.round_embed_scale else None,
                          embed_init_std=cfg.dim ** -0.5 if cfg.scale_embeddings else None)
    self.embed_norm = cfg.make_norm(cfg.dim) if cfg.embed_norm else None
    self.left_padding_invariant = not any(MIXERS[kind].token_aligned for kind in cfg.kinds)
    writers, readers = cfg.writers, cfg.readers
    make_block = functools.partial(self.make_block, cfg)
    self.groups, self.tail = stack.create_groups(make_block, shortest_period(writers), len(writers), rngs,
                                                 scan=cfg.scan_layers)
    if readers:
      MIXERS[readers[0]].build_stage(self, cfg, cfg.block(readers[0]), rngs)
    self.readers = stack.create_indexed_layers(lambda i, r: make_block(readers[0], i, r),
                                               range(len(writers), cfg.num_layers), rngs,
                                               scan=cfg.scan_layers and bool(readers))
    self.final_norm = cfg.make_norm(cfg.dim)

  @staticmethod
  def make_block(cfg: HybridConfig, kind: str, layer: int | jax.Array, rngs: nnx.Rngs) -> ResidualBlock:
    """Layer `layer`: the pre-norm residual block of mixer `kind` and the MLP."""
    mixer = MIXERS[kind].build(cfg, cfg.block(kind), layer, rngs)
    return ResidualBlock(cfg.dim, mixer, make_mlp(cfg, layer, rngs), norm=cfg.make_norm)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] (values [B, T, F]) -> x0 [B, T, D]: the first layer's input (and GOLD's value source)."""
    x = self.io.embed_tokens(tokens)
    if self.embed_norm is None:
      return x
    return sharding.constrain(self.embed_norm(x), (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED))

  # -- the shared-keys stage of the readers (architectures/shared_stages.py) -------------------------

  @property
  def stage(self) -> type:
    return MIXERS[self.config.readers[0]].stage

  def shared_keys(self, x: jax.Array, call: Call, cache: Any) -> tuple[SharedKeys, Any]:
    return self.stage.shared_keys(self, x, call, cache)

  def init_shared_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> Any:
    return self.stage.init_shared_cache(self, batch, max_len, dtype)

  def shared_flops_per_token(self) -> float:
    return self.stage.shared_flops_per_token(self)

  def reader_window(self) -> int:
    """1 + the positions each reader block reaches back (its mixer's token shift, the channel mix's)."""
    cfg = self.config
    return 1 + len(cfg.readers) * (MIXERS[cfg.readers[0]].reach + (cfg.mlp == 'channel_mix'))
