"""Next-token cross-entropy: -log softmax(logits)[target] = log-sum-exp(logits) - logits[target].

The target's logit is picked by a one-hot mask, not a gather: the backward,
softmax minus one-hot, is then one elementwise pass over the logits (fused
with the cast to the compute dtype), where a gather's transpose adds a
scatter and a second pass (~2 GB each in float32 at 16k targets and
vocabulary 32768). A target outside [0, V) gets log-sum-exp.

With a soft cap c > 0 the logits given are z, before the cap y = c tanh(z / c)
(Gemma 2, RecurrentGemma), and the cap is applied here, under a custom VJP:

  forward   y <= c, so log-sum-exp(y) = c + log sum exp(y - c) needs no max
            pass: one pass over z computes y and the sum, y is not stored;
            the target's z is gathered (B x L values; the backward below
            is its gradient, so no scatter) and capped.
  backward  dL/dz = g (exp(y - lse) - onehot) (1 - tanh(z / c)^2), one pass
            over z that recomputes y.

A model that returned y would have XLA store y (2 GB) for the backward and
take the max, the sum and the target in three more passes (docs/performance.md,
"The soft cap inside the loss", has the kernel times).
"""
import functools

import jax
import jax.numpy as jnp

# Without a max pass, each exp(y - c) >= exp(-2c) must stay a normal float32 (> 1.2e-38): c <= 43.
_MAX_SHIFT_FREE_CAP = 40.0


def _one_hot(targets: jax.Array, vocab: int) -> jax.Array:  # [B, L] -> [B, L, V] bool
  return targets[..., None] == jnp.arange(vocab, dtype=targets.dtype)


def cross_entropy(logits: jax.Array, targets: jax.Array, soft_cap: float = 0.0) -> jax.Array:
  """[B, L, V] float32, [B, L] int -> [B, L]; with soft_cap > 0, `logits` are before the cap."""
  if soft_cap > 0:
    return _soft_capped_cross_entropy(logits, targets, float(soft_cap))
  target_logits = jnp.sum(jnp.where(_one_hot(targets, logits.shape[-1]), logits, 0.0), axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - target_logits


def _capped_log_sum_exp(capped: jax.Array, cap: float) -> jax.Array:  # [B, L, V] -> [B, L]
  if cap > _MAX_SHIFT_FREE_CAP:
    return jax.nn.logsumexp(capped, axis=-1)
  return cap + jnp.log(jnp.sum(jnp.exp(capped - cap), axis=-1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _soft_capped_cross_entropy(z: jax.Array, targets: jax.Array, cap: float) -> jax.Array:
  return _soft_capped_forward(z, targets, cap)[0]


def _soft_capped_forward(z, targets, cap):
  lse = _capped_log_sum_exp(cap * jnp.tanh(z / cap), cap)  # [B, L]
  vocab = z.shape[-1]
  target_z = jnp.take_along_axis(z, jnp.clip(targets, 0, vocab - 1)[..., None], axis=-1)[..., 0]  # [B, L]
  target_logits = jnp.where((targets >= 0) & (targets < vocab), cap * jnp.tanh(target_z / cap), 0.0)
  return lse - target_logits, (z, targets, lse)


def _soft_capped_backward(cap, residuals, g):  # g [B, L]
  z, targets, lse = residuals
  tanh = jnp.tanh(z / cap)  # [B, L, V]
  d_capped = jnp.exp(cap * tanh - lse[..., None]) - _one_hot(targets, z.shape[-1])
  return g[..., None] * d_capped * (1.0 - tanh * tanh), None


_soft_capped_cross_entropy.defvjp(_soft_capped_forward, _soft_capped_backward)
