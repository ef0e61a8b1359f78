"""trainers/training/cross_entropy.py: the one-hot cross-entropy equals optax's (value and gradient); with a
soft cap, the fused form on the logits before the cap equals capping them and taking the plain
cross-entropy, in value and gradient, for a cap that skips the max pass and one that takes it, at
saturated logits, and for targets outside the vocabulary (log-sum-exp)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trainers.training.cross_entropy import cross_entropy

VOCAB = 11


def loss_and_grad(loss_fn, logits, targets):
  weights = jax.random.uniform(jax.random.key(2), targets.shape)  # [B, L]
  return jax.value_and_grad(lambda z: jnp.sum(loss_fn(z, targets) * weights))(logits)


def test_cross_entropy_matches_optax():
  logits = 5 * jax.random.normal(jax.random.key(0), (2, 6, VOCAB), jnp.float32)  # [B, L, V]
  targets = jax.random.randint(jax.random.key(1), (2, 6), 0, VOCAB)
  ours, reference = (loss_and_grad(f, logits, targets)
                     for f in (cross_entropy, optax.softmax_cross_entropy_with_integer_labels))
  np.testing.assert_allclose(ours[0], reference[0], rtol=1e-6)
  np.testing.assert_allclose(ours[1], reference[1], rtol=1e-5, atol=1e-7)
  outside = cross_entropy(logits, jnp.full((2, 6), -1))  # e.g. padding: log-sum-exp, finite
  np.testing.assert_allclose(outside, jax.nn.logsumexp(logits, axis=-1), rtol=1e-6)


@pytest.mark.parametrize('cap', [30.0, 50.0])  # 30: no max pass (RecurrentGemma's cap); 50: with one
def test_soft_capped_equals_capping_then_cross_entropy(cap):
  logits = 40 * jax.random.normal(jax.random.key(0), (2, 6, VOCAB), jnp.float32)  # many beyond the cap
  logits = logits.at[0, 0].set(-1e4).at[0, 1, 3].set(1e4)  # saturated: a row all at -cap, one logit at +cap
  targets = jax.random.randint(jax.random.key(1), (2, 6), 0, VOCAB).at[1, :2].set(jnp.array([-1, VOCAB]))
  fused = loss_and_grad(lambda z, t: cross_entropy(z, t, soft_cap=cap), logits, targets)
  reference = loss_and_grad(lambda z, t: cross_entropy(cap * jnp.tanh(z / cap), t), logits, targets)
  np.testing.assert_allclose(fused[0], reference[0], rtol=1e-6)
  np.testing.assert_allclose(fused[1], reference[1], rtol=1e-5, atol=1e-7)
  assert np.all(np.isfinite(fused[1]))
  per_target = cross_entropy(logits, targets, soft_cap=cap)
  np.testing.assert_allclose(per_target[1, :2], jax.nn.logsumexp(cap * jnp.tanh(logits[1, :2] / cap), axis=-1),
                             rtol=1e-6)  # targets outside [0, V)
