"""Decoder-only Transformer baseline, with global or sliding-window attention.

Pre-norm blocks (Llama / Mistral shape):
    h = x + Attention(RMSNorm(x));  out = h + GatedMLP(RMSNorm(h))
then a final RMSNorm and the logits (tied to the embedding or a separate head).
`window > 0` makes every layer sliding-window attention over W keys, with a
ring-buffer decode cache of W slots.
"""
import dataclasses

from flax import nnx

from architectures import registry
from architectures.base import DECODE_GEMV_OPTIONS, AttentionHeads
from architectures.decoder import Decoder, DecoderConfig
from layers.blocks import stack
from layers.blocks.mlp import ACTIVATIONS, GatedMLP
from layers.blocks.residual import Mixer, ResidualBlock
from layers.blocks.rope import STYLES, rotary_dims
from layers.mixers.attention import Attention


@dataclasses.dataclass(frozen=True)
class TransformerConfig(AttentionHeads, DecoderConfig):
  num_heads: int = 4
  num_kv_heads: int = 0        # 0: = num_heads (MHA); 1: MQA; else GQA
  head_dim: int = 0            # 0: = dim // num_heads
  mlp_activation: str = 'silu'
  window: int = 0              # 0: global causal attention; W > 0: sliding window of W keys
  rope_base: float = 10000.0
  rope_style: str = 'standard'
  rope_fraction: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    self.check_positive('num_heads', 'mlp_dim')
    self.check_heads()
    self.check(self.window >= 0, 'window', 'must be >= 0 (0 = global attention)')
    self.check(self.mlp_activation in ACTIVATIONS, 'mlp_activation', f'known: {sorted(ACTIVATIONS)}')
    self.check(self.rope_style in STYLES, 'rope_style', f'known: {STYLES}')
    try:
      rotary_dims(self.heads_dim, self.rope_fraction)
    except ValueError as e:
      self.check(False, 'rope_fraction', str(e))


@registry.register('transformer')
class Transformer(Decoder):
  Config = TransformerConfig
  decode_compiler_options = DECODE_GEMV_OPTIONS

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = cfg = config
    self.io = cfg.make_io(rngs)
    self.layers = stack.create_layers(lambda r: self.make_block(cfg, r), cfg.num_layers, rngs, scan=cfg.scan_layers)
    self.final_norm = cfg.make_norm(cfg.dim)

  @classmethod
  def make_block(cls, cfg: TransformerConfig, rngs: nnx.Rngs) -> ResidualBlock:
    mlp = GatedMLP(cfg.dim, cfg.mlp_dim, activation=cfg.mlp_activation, out_init_scale=cfg.residual_init_scale,
                   rngs=rngs, **cfg.dtypes)
    return ResidualBlock(cfg.dim, cls.make_mixer(cfg, rngs), mlp, norm=cfg.make_norm)

  @staticmethod
  def make_mixer(cfg: TransformerConfig, rngs: nnx.Rngs) -> Mixer:
    """The block's sequence mixer: causal (optionally sliding-window) attention."""
    return Attention(cfg.dim, cfg.num_heads, cfg.kv_heads, cfg.heads_dim, window=cfg.window or None,
                     rope_base=cfg.rope_base, rope_style=cfg.rope_style, rope_fraction=cfg.rope_fraction,
                     impl=cfg.attention_impl, out_init_scale=cfg.residual_init_scale, rngs=rngs, **cfg.dtypes)
