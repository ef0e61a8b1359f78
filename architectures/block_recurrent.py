"""Block-Recurrent Transformer (Hutchins et al. 2022, arXiv 2203.07852;
docs/architectures.md, Block-Recurrent Transformer).

Pre-norm layers (the Transformer baseline's shape, layers/blocks/residual.py) whose attention is windowed:
each window of `window` tokens attends to itself and the previous window, whose keys and values
come from a Transformer-XL cache (layers/mixers/windowed_attention.py). The layers at `recurrent_layers`
(default: the third from the top, meliad's -3) also carry `num_states` state vectors through the
block-recurrent cell (layers/mixers/block_recurrent.py):
    a = [SelfAttention(RMSNorm(x)) | ReadState(RMSNorm(x))]   (the second part in recurrent layers)
    h = x + a W_o;   out = h + GatedMLP(RMSNorm(h))
then a final RMSNorm and the logits (or forecasts, `input_features` > 0). Every layer's decode cache
is a ring of the last window's keys (two windows with window_span='block'); a recurrent layer's also
holds its state (float32) and the document the state belongs to. A call continues the sequence from
any cache: windows are aligned to token indices, the state advances at every window boundary the
call crosses, also when decoding token by token, and a long-document stream (config.streaming)
carries the cache between segments. `attention_impl` picks the kernel of a call's self-attention over
its own tokens where the kernels' mask is the windowed one (layers/mixers/windowed_attention.py).
"""
import dataclasses
from typing import ClassVar

from flax import nnx

from architectures import registry
from architectures.base import AttentionHeads
from architectures.decoder import Decoder, DecoderConfig
from layers.blocks.mlp import ACTIVATIONS, GatedMLP
from layers.blocks.residual import ResidualBlock
from layers.mixers.block_recurrent import GATES, VARIANTS, BlockRecurrentAttention
from layers.mixers.windowed_attention import POSITIONS, SPANS, WindowedAttention, kernel_mask


@dataclasses.dataclass(frozen=True)
class BlockRecurrentConfig(AttentionHeads, DecoderConfig):
  unsupported: ClassVar[dict[str, str]] = {
      'scan_layers': 'the layers are not alike (the recurrent layers, at recurrent_layers, carry a state '
                     'cell and a wider output projection), so there is no single layer to scan',
  }

  num_layers: int = 3
  num_heads: int = 4
  num_kv_heads: int = 0          # 0: = num_heads
  head_dim: int = 0              # 0: = dim // num_heads
  # (the shared mlp_dim: the token FFN, and the state FFN of the 'single' / 'dual' variants)
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

  def __post_init__(self):
    super().__post_init__()
    layers = self.recurrent_layers
    object.__setattr__(self, 'recurrent_layers', (layers,) if isinstance(layers, int) else tuple(layers))
    self.check_positive('num_heads', 'mlp_dim', 'window', 'num_states')
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
    if self.attention_impl in ('cudnn', 'splash'):
      self.check(kernel_mask(self.window_span, self.position), 'attention_impl',
                 'the kernels\' mask is the last W keys without a bias: needs window_span=\'sliding\' and '
                 f'position \'rope\' or \'none\' (got {self.window_span!r}, {self.position!r}; \'auto\' '
                 'falls back to the blocked XLA form)')
    self.check(self.mlp_activation in ACTIVATIONS, 'mlp_activation', f'known: {sorted(ACTIVATIONS)}')

  @property
  def recurrent_indices(self) -> tuple[int, ...]:
    return tuple(sorted(i % self.num_layers for i in self.recurrent_layers))


@registry.register('block_recurrent')
class BlockRecurrentTransformer(Decoder):
  """The generic decoder (architectures/decoder.py) over pre-norm windowed-attention layers, some recurrent."""

  Config = BlockRecurrentConfig
  left_padding_invariant = False  # windows are aligned to the row's token index

  def __init__(self, config: BlockRecurrentConfig, *, rngs: nnx.Rngs):
    self.config = cfg = config
    self.io = cfg.make_io(rngs)
    recurrent = set(cfg.recurrent_indices)
    self.layers = nnx.List([self.make_block(cfg, i in recurrent, rngs) for i in range(cfg.num_layers)])
    self.final_norm = cfg.make_norm(cfg.dim)

  @classmethod
  def make_block(cls, cfg: BlockRecurrentConfig, recurrent: bool, rngs: nnx.Rngs) -> ResidualBlock:
    """One pre-norm layer: windowed attention (and, if `recurrent`, the state read), then the gated MLP."""
    mixer = cls.make_mixer(cfg, recurrent, rngs)
    mlp = GatedMLP(cfg.dim, cfg.mlp_dim, activation=cfg.mlp_activation, out_init_scale=cfg.residual_init_scale,
                   rngs=rngs, **cfg.dtypes)
    return ResidualBlock(cfg.dim, mixer, mlp, norm=cfg.make_norm)

  @staticmethod
  def make_mixer(cfg: BlockRecurrentConfig, recurrent: bool, rngs: nnx.Rngs) -> WindowedAttention:
    """The layer's sequence mixer: windowed self-attention, which a recurrent layer extends with the state read."""
    attention = dict(window=cfg.window, span=cfg.window_span, position=cfg.position, qk_norm=cfg.qk_norm,
                     rope_base=cfg.rope_base, num_buckets=cfg.t5_buckets, max_distance=cfg.t5_max_distance,
                     impl=cfg.attention_impl, out_init_scale=cfg.residual_init_scale, rngs=rngs, **cfg.dtypes)
    heads = (cfg.dim, cfg.num_heads, cfg.kv_heads, cfg.heads_dim)
    if not recurrent:
      return WindowedAttention(*heads, **attention)
    return BlockRecurrentAttention(
        *heads, num_states=cfg.num_states, gate=cfg.gate, variant=cfg.variant, mlp_dim=cfg.mlp_dim,
        mlp_activation=cfg.mlp_activation, read_previous_window=cfg.state_reads_previous_window,
        tie_state_kv=cfg.tie_state_kv, norm_eps=cfg.norm_eps, **attention)
