"""The RG-LRU's per-position maths (De et al. 2024, "Griffin", eqs. 1-4) and their chain rule, elementwise.

    r_t = sigmoid(logit_a)   i_t = sigmoid(logit_x)   log a_t = -c r_t softplus(a_param)
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)

with a document start (a_t = 0, no sqrt factor) and padding (a_t = 1, no input).
Shared by the XLA form (layers/mixers/rg_lru.py, on whole [B, T, W] arrays) and the
fused GPU kernel (layers/kernels/pallas_rg_lru.py, on one time step of a block of
channels); every input broadcasts, every result is float32.

sqrt(1 - a^2)'s derivative is bounded by 1000 (taken at max(x, 1 / (4 * 1000^2))),
so a -> 1 gives no infinite gradient (recurrentgemma's `sqrt_bound_derivative`).
"""
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

MAX_SQRT_GRADIENT = 1000.0


def _sqrt_floor(max_gradient: float) -> float:
  """Below this x the derivative 0.5 / sqrt(x) would exceed max_gradient: it is taken here instead."""
  return 1.0 / (4.0 * max_gradient ** 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bounded_derivative(x: jax.Array, max_gradient: float) -> jax.Array:
  """sqrt(x) whose derivative is at most `max_gradient` (evaluated at max(x, 1 / (4 max_gradient^2)))."""
  return jnp.sqrt(x)


def _sqrt_forward(x, max_gradient):
  del max_gradient
  return jnp.sqrt(x), x


def _sqrt_backward(max_gradient, x, cotangent):
  return (cotangent * 0.5 * jax.lax.rsqrt(jnp.maximum(x, _sqrt_floor(max_gradient))),)


sqrt_bounded_derivative.defvjp(_sqrt_forward, _sqrt_backward)


class Gates(NamedTuple):
  """Eqs. 1-3 at each position (float32)."""
  gate_x: jax.Array        # i_t
  gate_a: jax.Array        # r_t
  decay: jax.Array         # exp(log a_t), unmasked
  one_minus_a2: jax.Array  # 1 - a_t^2 = -expm1(2 log a_t)
  multiplier: jax.Array    # sqrt(1 - a_t^2), 1 at a document start
  a: jax.Array             # the decay the recurrence uses: 0 at a document start, 1 on padding


def gates(logit_x: jax.Array, logit_a: jax.Array, softplus: jax.Array, reset: jax.Array, padding: jax.Array,
          c: float, sqrt: Callable[[jax.Array], jax.Array] = jnp.sqrt) -> Gates:
  """Eqs. 1-3 from the gates' pre-activations and softplus(a_param); `sqrt` is what takes sqrt(1 - a^2)."""
  gate_x = jax.nn.sigmoid(logit_x.astype(jnp.float32))
  gate_a = jax.nn.sigmoid(logit_a.astype(jnp.float32))
  log_a = -c * gate_a * softplus
  decay = jnp.exp(log_a)
  one_minus_a2 = -jnp.expm1(2 * log_a)
  multiplier = jnp.where(reset, 1.0, sqrt(one_minus_a2))
  a = jnp.where(padding, 1.0, jnp.where(reset, 0.0, decay))
  return Gates(gate_x, gate_a, decay, one_minus_a2, multiplier, a)


def normalized_input(x: jax.Array, g: Gates, padding: jax.Array) -> jax.Array:
  """Eq. 4's input term sqrt(1 - a_t^2) (i_t x_t); 0 on padding."""
  return jnp.where(padding, 0.0, x.astype(jnp.float32) * g.gate_x * g.multiplier)


class GateGradients(NamedTuple):
  x: jax.Array         # dL/dx_t
  logit_x: jax.Array   # dL/d(input gate's pre-activation)
  logit_a: jax.Array   # dL/d(recurrence gate's pre-activation)
  softplus: jax.Array  # this position's term of dL/d softplus(a_param) (summed over batch and time by the caller)


def chain_rule(d_h: jax.Array, h_before: jax.Array, x: jax.Array, g: Gates, softplus: jax.Array, reset: jax.Array,
               padding: jax.Array, c: float) -> GateGradients:
  """From d_h = dL/dh_t (through every later step) and h_{t-1} to the gradients of the position's inputs."""
  real = jnp.logical_not(padding)
  x = x.astype(jnp.float32)
  d_decay = jnp.where(real & jnp.logical_not(reset), d_h * h_before, 0.0)  # through a_t h_{t-1}
  d_input = jnp.where(real, d_h, 0.0)                                          # through the input term
  d_multiplier = jnp.where(reset, 0.0, d_input * x * g.gate_x)
  # d(1 - a^2) / d log a = -2 a^2; the bounded sqrt's derivative is 0.5 rsqrt(max(1 - a^2, floor)).
  bounded_rsqrt = jax.lax.rsqrt(jnp.maximum(g.one_minus_a2, _sqrt_floor(MAX_SQRT_GRADIENT)))
  d_log_a = d_decay * g.decay - d_multiplier * bounded_rsqrt * (g.decay * g.decay)
  d_gate_x = d_input * x * g.multiplier
  return GateGradients(x=d_input * g.gate_x * g.multiplier,
                       logit_x=d_gate_x * g.gate_x * (1 - g.gate_x),
                       logit_a=-c * softplus * d_log_a * g.gate_a * (1 - g.gate_a),
                       softplus=-c * g.gate_a * d_log_a)
