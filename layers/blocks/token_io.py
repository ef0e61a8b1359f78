"""Token embedding in, logits out: the two ends every language model shares.

in:  x = E[token] (times sqrt(D) when `scale_embeddings`, Gemma-style; the
     constant can first be rounded to a given dtype: RecurrentGemma rounds it
     to bfloat16 whatever the compute dtype)
out: logits = h E^T (tied) or h W_out, in float32, optionally soft-capped
     c * tanh(logits / c) (Gemma 2, RecurrentGemma); `capped=False` leaves the
     cap to a loss that applies it in its own pass (trainers/training/cross_entropy.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import sharding
from layers.blocks.embedding import Embed
from layers.blocks.linear import Dense


class TokenIO(nnx.Module):

  def __init__(self, vocab_size: int, dim: int, *, tie_embeddings: bool, scale_embeddings: bool | None = None,
               round_scale_to: jnp.dtype | None = None, logits_soft_cap: float = 0.0,
               embed_init_std: float | None = None, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    """Defaults: tied tables start at std 1/sqrt(D) and are scaled by sqrt(D) on input; untied at std 1.

    round_scale_to: the dtype sqrt(D) is rounded to before it scales the embedding (None: not rounded).
    """
    self.scale_embeddings = tie_embeddings if scale_embeddings is None else scale_embeddings
    scale = np.float32(dim ** 0.5)  # numpy: a constant, also when the model is built under a trace
    self.input_scale = float(scale if round_scale_to is None else scale.astype(round_scale_to))
    self.logits_soft_cap = logits_soft_cap
    self.dim, self.vocab_size = dim, vocab_size
    if embed_init_std is None:
      embed_init_std = dim ** -0.5 if tie_embeddings else 1.0
    self.embed = Embed(vocab_size, dim, init_std=embed_init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.lm_head = None if tie_embeddings else Dense(
        dim, vocab_size, names=(sharding.EMBED, sharding.VOCAB), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def flops_per_token(self) -> float:
    """The logits' matmul (the embedding is a lookup)."""
    return 2 * self.dim * self.vocab_size

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:  # [B, T] int32 -> [B, T, D]
    x = self.embed(tokens)
    if self.scale_embeddings:
      x = x * jnp.asarray(self.input_scale, x.dtype)
    return sharding.constrain(x, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED))

  def logits(self, h: jax.Array, capped: bool = True) -> jax.Array:  # [B, T, D] -> [B, T, V] float32
    logits = self.embed.attend(h) if self.lm_head is None else self.lm_head(h).astype(jnp.float32)
    if self.logits_soft_cap and capped:
      logits = self.logits_soft_cap * jnp.tanh(logits / self.logits_soft_cap)
    return sharding.constrain(logits, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_VOCAB))
