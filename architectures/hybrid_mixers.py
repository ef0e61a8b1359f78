"""The mixers a hybrid stacks (architectures/hybrid.py), by name: each with its config block
(`config.model.<block>`: defaults, checks) and a factory that builds an existing mixer from it.

  mixer               block              builds
  attention           attention          layers/mixers/attention.Attention: causal, global (window 0) or over the last
                                         `window` keys; GQA; RoPE (the Transformer's)
  local_attention     local_attention    the same over the last `window` keys; by default Griffin's local MQA (one K/V
                                         head, RoPE on half of each head, an output bias)
  rg_lru              rg_lru             architectures/griffin.RecurrentBlock: RG-LRU + temporal conv (Griffin, Hawk)
  gated_retention     gated_retention    layers/mixers/gated_retention.GatedRetention (YOCO's self-decoder)
  wkv6                wkv6               layers/mixers/rwkv6.TimeMix: RWKV-6 time mix, 'finch' or 'finch_c2'
  aaren               aaren              layers/mixers/aaren.Aaren: learned queries, prefix-scan softmax
  windowed_attention  block_recurrent    layers/mixers/windowed_attention.WindowedAttention (Transformer-XL window)
  block_recurrent     block_recurrent    layers/mixers/block_recurrent.BlockRecurrentAttention: the window + state cell
  cross_attention     cross_attention    architectures/yoco.CrossAttention, reading YOCO's shared K/V (a reader)
  gold                gold               layers/mixers/gold_attention.GoldAttention, reading GoldFinch's compressed
                                         keys (a reader)

A reader reads the keys of a shared-keys stage (architectures/shared_stages.py) that the model builds from the
output of the layers before the readers; the factory of that stage is the reader's `build_stage`.
"""
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from flax.core import FrozenDict

from architectures.base import ConfigError
from architectures.griffin import RecurrentBlock
from architectures.shared_stages import CompressedKeys, SharedKV
from architectures.yoco import CrossAttention
from layers.blocks.residual import Mixer
from layers.blocks.rope import FREQUENCIES, STYLES, rotary_dims
from layers.kernels.pallas_wkv import supports as fused_wkv_supports
from layers.mixers import aaren, block_recurrent, rg_lru, rwkv6, wkv
from layers.mixers.attention import Attention
from layers.mixers.gated_retention import GatedRetention
from layers.mixers.gold_attention import GoldAttention, KeyCompression
from layers.mixers.windowed_attention import POSITIONS, SPANS, WindowedAttention, kernel_mask

Layer = int | jax.Array  # the layer's index in the model (traced in scanned layers)


class Block:
  """One config block as its mixers read it (`block['key']`) and check it (one line naming the key)."""

  def __init__(self, cfg: Any, name: str):
    self.cfg, self.name, self.values = cfg, name, getattr(cfg, name)

  def __getitem__(self, key: str) -> Any:
    return self.values[key]

  def check(self, condition: bool, key: str, message: str) -> None:
    if not condition:
      raise ConfigError(f'config.model.{self.name}.{key}={self.values[key]!r}: {message} '
                        f'(a mixer of config.model.layers={self.cfg.layers!r})')

  def positive(self, *keys: str) -> None:
    for key in keys:
      self.check(self[key] > 0, key, 'must be positive')

  def known(self, key: str, choices) -> None:
    self.check(self[key] in choices, key, f'known: {tuple(choices)}')

  def divides(self, key: str, whole: int, what: str) -> None:
    self.check(self[key] > 0 and whole % self[key] == 0, key, f'does not divide {what}={whole}')

  def heads(self) -> tuple[int, int, int]:
    """(query heads, K/V heads, head size) of an attention block: num_kv_heads 0 (or none) = num_heads, head_dim
    0 = dim / num_heads."""
    dim, heads = self.cfg.dim, self['num_heads']
    self.positive('num_heads')
    if not self['head_dim']:
      self.divides('num_heads', dim, 'config.model.dim')
    self.check(self['head_dim'] >= 0, 'head_dim', 'must be >= 0 (0: dim / num_heads)')
    kv = self.values.get('num_kv_heads', 0) or heads
    if 'num_kv_heads' in self.values:
      self.check(self['num_kv_heads'] >= 0 and heads % kv == 0, 'num_kv_heads',
                 f'must divide config.model.{self.name}.num_heads={heads}')
    return heads, kv, self['head_dim'] or dim // heads

  def rope(self, head_dim: int, fraction: float = 1.0) -> None:
    """The RoPE keys (rope_style, rope_frequencies where present) and the rotated fraction of `head_dim`."""
    for key, choices in (('rope_style', STYLES), ('rope_frequencies', FREQUENCIES)):
      if key in self.values:
        self.known(key, choices)
    try:
      rotary_dims(head_dim, fraction)
    except ValueError as e:
      self.check(False, 'rope_fraction' if 'rope_fraction' in self.values else 'num_heads', str(e))


# -- the blocks: defaults and checks -------------------------------------------------------------------

ATTENTION = dict(num_heads=4, num_kv_heads=0, head_dim=0, window=0, rope_base=10000.0, rope_style='standard',
                 rope_fraction=1.0, rope_frequencies='standard', out_bias=False)
BLOCKS: dict[str, dict[str, Any]] = {
    'attention': ATTENTION,
    'local_attention': dict(ATTENTION, num_kv_heads=1, window=1024, rope_fraction=0.5, out_bias=True),
    'rg_lru': dict(width=0, num_heads=4, conv_width=4, c=8.0, min_rad=0.9, max_rad=0.999, impl='auto',
                   chunk_size=128),
    'gated_retention': dict(num_heads=4, chunk_size=256, gate_logit_normalizer=16.0, rope_base=10000.0,
                            rope_style='interleaved', rope_frequencies='linspace'),
    'wkv6': dict(head_dim=64, variant='finch', mix_lora_rank=32, decay_lora_rank=64, impl='auto', chunk_size=64),
    'aaren': dict(num_heads=4, head_dim=0, impl='chunked', chunk_size=64),
    'block_recurrent': dict(num_heads=4, num_kv_heads=0, head_dim=0, window=64, span='sliding', position='rope',
                            qk_norm=False, rope_base=10000.0, t5_buckets=32, t5_max_distance=128, num_states=8,
                            gate='fixed', variant='skip', state_reads_previous_window=False, tie_state_kv=False),
    'cross_attention': dict(num_heads=4, num_kv_heads=0, rope_base=10000.0, rope_style='interleaved',
                            rope_frequencies='linspace'),
    'gold': dict(head_dim=64, key_compression=16, mix_lora_rank=32, lora_rank=0, rope=False, rope_base=10000.0),
}


def check_attention(b: Block) -> None:
  _, _, head_dim = b.heads()
  b.check(b['window'] >= 0 if b.name == 'attention' else b['window'] > 0, 'window',
          'must be >= 0 (0: global)' if b.name == 'attention' else 'must be positive')
  b.rope(head_dim, b['rope_fraction'])


def check_rg_lru(b: Block) -> None:
  b.check(b['width'] >= 0, 'width', 'must be >= 0 (0: config.model.dim)')
  b.divides('num_heads', b['width'] or b.cfg.dim, 'the width')
  b.positive('conv_width', 'c', 'chunk_size')
  b.check(0 < b['min_rad'] < b['max_rad'] < 1, 'min_rad', f'must be in (0, max_rad={b["max_rad"]}), max_rad < 1')
  b.known('impl', rg_lru.IMPLEMENTATIONS)


def check_gated_retention(b: Block) -> None:
  b.divides('num_heads', b.cfg.dim, 'config.model.dim')
  b.rope(b.cfg.dim // b['num_heads'])
  b.positive('chunk_size', 'gate_logit_normalizer')


def check_wkv6(b: Block) -> None:
  b.divides('head_dim', b.cfg.dim, 'config.model.dim')
  b.known('variant', rwkv6.VARIANTS)
  b.positive('mix_lora_rank', 'decay_lora_rank', 'chunk_size')
  b.known('impl', wkv.IMPLEMENTATIONS)
  b.check(b['impl'] != 'fused' or fused_wkv_supports(b['head_dim'], b['head_dim'], b['chunk_size']), 'impl',
          "'fused' needs head_dim and chunk_size to be powers of two >= 16")


def check_aaren(b: Block) -> None:
  b.heads()
  b.known('impl', aaren.IMPLEMENTATIONS)
  b.positive('chunk_size')


def check_block_recurrent(b: Block) -> None:
  _, _, head_dim = b.heads()
  b.positive('window', 'num_states')
  b.known('span', SPANS)
  b.known('position', POSITIONS)
  b.known('gate', block_recurrent.GATES)
  b.known('variant', block_recurrent.VARIANTS)
  b.check(b['position'] != 'rope' or head_dim % 2 == 0, 'position', 'RoPE needs an even head size')
  b.check(b['position'] != 't5' or b['t5_buckets'] >= 2 and b['t5_buckets'] % 2 == 0, 't5_buckets',
          'must be even and >= 2')
  b.check(b['position'] != 't5' or b['t5_max_distance'] > b['t5_buckets'] // 2, 't5_max_distance',
          'must exceed t5_buckets / 2')
  b.check(b.cfg.attention_impl not in ('cudnn', 'splash') or kernel_mask(b['span'], b['position']), 'span',
          f"config.model.attention_impl={b.cfg.attention_impl!r} needs span 'sliding' and position 'rope' or 'none'")


def check_cross_attention(b: Block) -> None:
  b.divides('num_heads', b.cfg.dim, 'config.model.dim')
  kv = b['num_kv_heads'] or b['num_heads']
  b.check(b['num_kv_heads'] >= 0 and b['num_heads'] % kv == 0, 'num_kv_heads',
          f'must divide config.model.cross_attention.num_heads={b["num_heads"]}')
  b.rope(b.cfg.dim // b['num_heads'])


def check_gold(b: Block) -> None:
  b.divides('head_dim', b.cfg.dim, 'config.model.dim')
  b.divides('key_compression', b.cfg.dim, 'config.model.dim')
  b.positive('mix_lora_rank')
  b.check(b['lora_rank'] >= 0, 'lora_rank', 'must be >= 0 (0: max(dim / 16, 64))')
  b.check(not b['rope'] or b['head_dim'] % 2 == 0, 'rope', 'RoPE needs an even head_dim')


CHECKS: dict[str, Callable[[Block], None]] = {
    'attention': check_attention, 'local_attention': check_attention, 'rg_lru': check_rg_lru,
    'gated_retention': check_gated_retention, 'wkv6': check_wkv6, 'aaren': check_aaren,
    'block_recurrent': check_block_recurrent, 'cross_attention': check_cross_attention, 'gold': check_gold}


# -- the factories: (config, its block, the layer's index, rngs) -> the mixer ----------------------------

def mixer_options(cfg: Any) -> dict[str, Any]:
  """What every mixer takes from the model: the init scale of its output projection and the dtypes."""
  return dict(out_init_scale=cfg.residual_init_scale, **cfg.dtypes)


def attention(cfg: Any, b: Block, layer: Layer, rngs: nnx.Rngs) -> Attention:
  del layer
  return Attention(cfg.dim, *b.heads(), window=b['window'] or None, rope_base=b['rope_base'],
                   rope_style=b['rope_style'], rope_fraction=b['rope_fraction'],
                   rope_frequencies=b['rope_frequencies'], impl=cfg.attention_impl, out_bias=b['out_bias'],
                   rngs=rngs, **mixer_options(cfg))


def recurrent_block(cfg: Any, b: Block, layer: Layer, rngs: nnx.Rngs) -> RecurrentBlock:
  del layer
  return RecurrentBlock(cfg.dim, b['width'] or cfg.dim, b['num_heads'], conv_width=b['conv_width'], lru_c=b['c'],
                        lru_min_rad=b['min_rad'], lru_max_rad=b['max_rad'], lru_impl=b['impl'],
                        lru_chunk_size=b['chunk_size'], rngs=rngs, **mixer_options(cfg))


def gated_retention(cfg: Any, b: Block, layer: Layer, rngs: nnx.Rngs) -> GatedRetention:
  del layer
  heads = b['num_heads']
  return GatedRetention(cfg.dim, heads, cfg.dim // heads, chunk_size=b['chunk_size'],
                        gate_logit_normalizer=b['gate_logit_normalizer'], norm_eps=cfg.norm_eps,
                        rope_base=b['rope_base'], rope_style=b['rope_style'], rope_frequencies=b['rope_frequencies'],
                        rngs=rngs, **mixer_options(cfg))


def time_mix(cfg: Any, b: Block, layer: Layer, rngs: nnx.Rngs) -> rwkv6.TimeMix:
  return rwkv6.TimeMix(cfg.dim, cfg.dim // b['head_dim'], b['head_dim'], layer=layer, num_layers=cfg.num_layers,
                       variant=b['variant'], mix_rank=b['mix_lora_rank'], decay_rank=b['decay_lora_rank'],
                       impl=b['impl'], chunk_size=b['chunk_size'], rngs=rngs, **mixer_options(cfg))


def aaren_mixer(cfg: Any, b: Block, layer: Layer, rngs: nnx.Rngs) -> aaren.Aaren:
  del layer
  heads, _, head_dim = b.heads()
  return aaren.Aaren(cfg.dim, heads, head_dim, impl=b['impl'], chunk_size=b['chunk_size'], rngs=rngs,
                     **mixer_options(cfg))


def windowed(recurrent: bool) -> Callable[[Any, Block, Layer, nnx.Rngs], WindowedAttention]:
  """The factory of the block-recurrent family's windowed attention, with the state cell if `recurrent`."""

  def build(cfg: Any, b: Block, layer: Layer, rngs: nnx.Rngs) -> WindowedAttention:
    del layer
    attention = dict(window=b['window'], span=b['span'], position=b['position'], qk_norm=b['qk_norm'],
                     rope_base=b['rope_base'], num_buckets=b['t5_buckets'], max_distance=b['t5_max_distance'],
                     impl=cfg.attention_impl, rngs=rngs, **mixer_options(cfg))
    if not recurrent:
      return WindowedAttention(cfg.dim, *b.heads(), **attention)
    return block_recurrent.BlockRecurrentAttention(
        cfg.dim, *b.heads(), num_states=b['num_states'], gate=b['gate'], variant=b['variant'], mlp_dim=cfg.mlp_dim,
        mlp_activation=cfg.mlp_activation, read_previous_window=b['state_reads_previous_window'],
        tie_state_kv=b['tie_state_kv'], norm_eps=cfg.norm_eps, **attention)

  return build


def cross_rope(b: Block) -> FrozenDict:
  return FrozenDict(base=b['rope_base'], style=b['rope_style'], frequencies=b['rope_frequencies'])


def cross_attention(cfg: Any, b: Block, layer: Layer, rngs: nnx.Rngs) -> CrossAttention:
  del layer
  heads = b['num_heads']
  return CrossAttention(cfg.dim, heads, cfg.dim // heads, rope=cross_rope(b), impl=cfg.attention_impl, rngs=rngs,
                        **mixer_options(cfg))


def shared_kv(model: SharedKV, cfg: Any, b: Block, rngs: nnx.Rngs) -> None:
  """YOCO's K/V stage for the cross-attention layers: K/V heads num_kv_heads, head size dim / num_heads."""
  model.build_shared_kv(cfg, b['num_kv_heads'] or b['num_heads'], cfg.dim // b['num_heads'], cross_rope(b), rngs)


def gold_attention(cfg: Any, b: Block, layer: Layer, rngs: nnx.Rngs) -> GoldAttention:
  return GoldAttention(cfg.dim, cfg.dim // b['head_dim'], b['head_dim'], layer=layer, num_layers=cfg.num_layers,
                       mix_rank=b['mix_lora_rank'], kv_rank=b['lora_rank'], rope=b['rope'], rope_base=b['rope_base'],
                       impl=cfg.attention_impl, rngs=rngs, **mixer_options(cfg))


def compressed_keys(model: CompressedKeys, cfg: Any, b: Block, rngs: nnx.Rngs) -> None:
  """GoldFinch's key compression (D -> D / key_compression) for the GOLD layers."""
  model.compression = KeyCompression(cfg.dim, b['key_compression'], rngs=rngs, **cfg.dtypes)


@dataclasses.dataclass(frozen=True)
class MixerKind:
  """A mixer name of config.model.layers: its block and factory; for a reader, its stage."""
  block: str                                              # config.model.<block> configures it
  build: Callable[[Any, Block, Layer, nnx.Rngs], Mixer]   # (config, block, layer index, rngs) -> the mixer
  stage: type | None = None                               # a reader: the stage class whose keys it reads
  build_stage: Callable[[Any, Any, Block, nnx.Rngs], None] | None = None  # (model, config, block, rngs)
  reach: int = 0              # a reader: positions back its output reads besides the shared keys (token shifts)
  token_aligned: bool = False  # windows aligned to the row's token index: left padding changes a row's result


MIXERS: Mapping[str, MixerKind] = {
    'attention': MixerKind('attention', attention),
    'local_attention': MixerKind('local_attention', attention),
    'rg_lru': MixerKind('rg_lru', recurrent_block),
    'gated_retention': MixerKind('gated_retention', gated_retention),
    'wkv6': MixerKind('wkv6', time_mix),
    'aaren': MixerKind('aaren', aaren_mixer),
    'windowed_attention': MixerKind('block_recurrent', windowed(False), token_aligned=True),
    'block_recurrent': MixerKind('block_recurrent', windowed(True), token_aligned=True),
    'cross_attention': MixerKind('cross_attention', cross_attention, stage=SharedKV, build_stage=shared_kv),
    'gold': MixerKind('gold', gold_attention, stage=CompressedKeys, build_stage=compressed_keys, reach=1),
}
