"""Aaren (Feng et al. 2024): the Transformer with every attention replaced by Aaren.

Same pre-norm blocks, MLP, embeddings and head as architectures/transformer.py;
the mixer is layers/mixers/aaren.Aaren (a learned query per head and layer, softmax
attention over the prefix computed as a prefix scan). Its decode cache is the
(m, u, w) state of each layer, so `cache_bytes` does not grow with context.
"""
import dataclasses

from flax import nnx

from architectures import registry
from architectures.transformer import Transformer, TransformerConfig
from layers.blocks.residual import Mixer
from layers.mixers import aaren


@dataclasses.dataclass(frozen=True)
class AarenConfig(TransformerConfig):
  aaren_impl: str = 'chunked'   # 'chunked' (dense inside chunks, scan across) or 'scan' (associative scan)
  chunk_size: int = 64

  def __post_init__(self):
    super().__post_init__()
    self.check(self.aaren_impl in aaren.IMPLEMENTATIONS, 'aaren_impl', f'known: {aaren.IMPLEMENTATIONS}')
    self.check(self.chunk_size > 0, 'chunk_size', 'must be positive')
    self.check(self.window == 0, 'window', 'Aaren attends over the whole prefix; a window is not defined')
    self.check(self.num_kv_heads in (0, self.num_heads), 'num_kv_heads', 'Aaren has one key/value head per query')


@registry.register('aaren')
class Aaren(Transformer):
  Config = AarenConfig

  @staticmethod
  def make_mixer(cfg: AarenConfig, rngs: nnx.Rngs) -> Mixer:
    return aaren.Aaren(cfg.dim, cfg.num_heads, cfg.heads_dim, impl=cfg.aaren_impl, chunk_size=cfg.chunk_size,
                       out_init_scale=cfg.residual_init_scale, rngs=rngs, **cfg.dtypes)
