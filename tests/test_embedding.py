"""The tied logits h E^T: float32 logits whose backward matmuls run in the compute dtype."""
import jax
import jax.numpy as jnp
import numpy as np

from layers.blocks.embedding import logits_matmul


def _inputs(dtype):
  kx, kt, kw = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 5, 16), jnp.float32).astype(dtype)  # [B, T, D]
  table = jax.random.normal(kt, (40, 16), jnp.float32).astype(dtype)  # [V, D]
  weights = jax.random.normal(kw, (2, 5, 40), jnp.float32)          # [B, T, V]
  return x, table, weights


def _grads(matmul, x, table, weights):
  return jax.grad(lambda x, t: jnp.sum(matmul(x, t) * weights), argnums=(0, 1))(x, table)


def _einsum(x, table):
  return jnp.einsum('btd,vd->btv', x, table, preferred_element_type=jnp.float32)


def test_float32_is_plain_autodiff():
  x, table, weights = _inputs(jnp.float32)
  for ours, reference in zip(_grads(logits_matmul, x, table, weights), _grads(_einsum, x, table, weights)):
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)


def test_bfloat16_backward_matmuls_take_bfloat16_inputs():
  x, table, weights = _inputs(jnp.bfloat16)
  assert logits_matmul(x, table).dtype == jnp.float32
  def backward_dot_input_dtypes(matmul):  # the forward dot is nested in the custom_vjp call
    jaxpr = jax.make_jaxpr(lambda x, t: _grads(matmul, x, t, weights))(x, table).jaxpr
    dots = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == 'dot_general'][-2:]  # d/dx, d/dtable
    return {str(var.aval.dtype) for eqn in dots for var in eqn.invars}
  assert backward_dot_input_dtypes(_einsum) == {'float32', 'bfloat16'}  # autodiff: float32 GEMMs
  assert backward_dot_input_dtypes(logits_matmul) == {'bfloat16'}
  reference = _grads(_einsum, x.astype(jnp.float32), table.astype(jnp.float32), weights)
  for ours, exact in zip(_grads(logits_matmul, x, table, weights), reference):
    np.testing.assert_allclose(np.asarray(ours, np.float32), exact, rtol=3e-2, atol=3e-2)
