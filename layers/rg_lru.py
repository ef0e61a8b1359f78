"""Real-Gated Linear Recurrent Unit (RG-LRU; De et al. 2024, "Griffin", eqs. 1-4).

For input x_t (width W, split into `num_heads` blocks for the gates):

    r_t = sigmoid(W_a x_t + b_a)            recurrence gate  (block-diagonal W_a)
    i_t = sigmoid(W_x x_t + b_x)            input gate       (block-diagonal W_x)
    log a_t = -c * r_t * softplus(a_param)  c = 8; a = sigma(Lambda)^(c r) with a_param = -Lambda
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)

At a document start (position 0) the previous state is dropped and the sqrt
factor is not applied: h_t = i_t * x_t. Padding (position -1) leaves the state
as it is (a = 1, no input), so real tokens never see it. The state and the
elementwise maths are float32 whatever the compute dtype; the gate matmuls
run in the compute dtype; the output is cast back to it.

sqrt(1 - a^2) uses a square root whose derivative is bounded by 1000 (taken at
max(x, 1 / (4 * 1000^2))), so a -> 1 gives no infinite gradient in bf16
(recurrentgemma's `sqrt_bound_derivative`).

`a_param` starts so that a = exp(-softplus(a_param)) lies in [0.9, 0.999],
uniform by area of the ring: a = sqrt(U(0.9^2, 0.999^2)).
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.linear_recurrence import IMPLEMENTATIONS, linear_recurrence

MAX_SQRT_GRADIENT = 1000.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bounded_derivative(x: jax.Array, max_gradient: float) -> jax.Array:
  """sqrt(x) whose derivative is at most `max_gradient` (evaluated at max(x, 1 / (4 max_gradient^2)))."""
  return jnp.sqrt(x)


def _sqrt_forward(x, max_gradient):
  del max_gradient
  return jnp.sqrt(x), x


def _sqrt_backward(max_gradient, x, cotangent):
  floor = 1.0 / (4.0 * max_gradient ** 2)
  return (cotangent * 0.5 * jax.lax.rsqrt(jnp.maximum(x, floor)),)


sqrt_bounded_derivative.defvjp(_sqrt_forward, _sqrt_backward)


def a_param_init(min_rad: float = 0.9, max_rad: float = 0.999):
  """Initialiser of a_param: a = exp(-softplus(a_param)) with a^2 ~ U(min_rad^2, max_rad^2)."""
  def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    a_squared = jax.random.uniform(key, shape, jnp.float32, min_rad ** 2, max_rad ** 2)
    minus_log_a = -0.5 * jnp.log(a_squared)        # = softplus(a_param) > 0
    return jnp.log(jnp.expm1(minus_log_a)).astype(dtype)  # softplus^-1
  return init


class BlockDiagonalLinear(nnx.Module):
  """`num_outputs` maps y_g = x W_g + b_g, each W_g block-diagonal: `num_blocks` independent [W/n, W/n] blocks.

  Kernel [G, n, W/n, W/n] (fan-in normal over one block's inputs), bias [G, n, W/n];
  [..., W] -> [..., G, W]. The RG-LRU's two gates are G = 2 maps of one einsum.
  """

  def __init__(self, width: int, num_blocks: int, num_outputs: int = 1, *, init_scale: float = 1.0,
               dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if width % num_blocks:
      raise ValueError(f'num_blocks {num_blocks} does not divide width {width}')
    self.num_blocks = num_blocks
    self.dtype = dtype
    block = width // num_blocks
    init = nnx.initializers.variance_scaling(init_scale, 'fan_in', 'truncated_normal',
                                             in_axis=2, out_axis=3, batch_axis=(0, 1))
    # The blocks stay replicated: num_heads (10 in RecurrentGemma-2B) need not divide the tensor axis.
    self.kernel = nnx.Param(sharding.partitioned(init, (None, None, None, None))(
        rngs.params(), (num_outputs, num_blocks, block, block), param_dtype))
    self.bias = nnx.Param(sharding.partitioned(nnx.initializers.zeros, (None, None, None))(
        None, (num_outputs, num_blocks, block), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., W] -> [..., G, W]
    blocks = x.astype(self.dtype).reshape(*x.shape[:-1], self.num_blocks, -1)
    y = jnp.einsum('...hi,ghij->...ghj', blocks, self.kernel[...].astype(self.dtype))
    y = y + self.bias[...].astype(self.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-3], x.shape[-1])


class RGLRU(nnx.Module):

  def __init__(self, width: int, num_heads: int, *, c: float = 8.0, min_rad: float = 0.9, max_rad: float = 0.999,
               impl: str = 'auto', chunk_size: int = 128, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if impl not in IMPLEMENTATIONS:
      raise ValueError(f'unknown RG-LRU impl {impl!r}; known: {IMPLEMENTATIONS}')
    self.c = c
    self.impl, self.chunk_size = impl, chunk_size
    self.width = width
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gates = BlockDiagonalLinear(width, num_heads, 2, **common)  # [input gate, recurrence (a) gate]
    self.a_param = nnx.Param(sharding.partitioned(a_param_init(min_rad, max_rad), (sharding.LRU,))(
        rngs.params(), (width,), param_dtype))

  def init_state(self, batch: int) -> jax.Array:
    return jnp.zeros((batch, self.width), jnp.float32)

  def __call__(self, x: jax.Array, positions: jax.Array,
               state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [B, T, W], positions [B, T], state [B, W] float32 (None: zeros) -> y [B, T, W], last state [B, W]."""
    gate_logits = self.gates(x)  # [B, T, 2, W]: input gate, recurrence gate
    return rg_lru(x, gate_logits, self.a_param[...], positions, state, c=self.c, impl=self.impl,
                  chunk_size=self.chunk_size)


@functools.partial(jax.jit, static_argnames=('c', 'impl', 'chunk_size'))
def rg_lru(x: jax.Array, gate_logits: jax.Array, a_param: jax.Array, positions: jax.Array, state: jax.Array | None,
           *, c: float = 8.0, impl: str = 'auto', chunk_size: int = 128) -> tuple[jax.Array, jax.Array]:
  """The RG-LRU from its gates' pre-activations [B, T, 2, W] (a pure function; jitted, so that an
  un-jitted call compiles it once rather than op by op)."""
  if state is None:
    state = jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32)
  return _rg_lru(x, gate_logits, a_param, positions, state.astype(jnp.float32), c, impl, chunk_size)


def _gates(gate_logits: jax.Array, a_param: jax.Array, positions: jax.Array, c: float) -> tuple[jax.Array, ...]:
  """Eqs. 1-3: i_t, r_t, softplus(a_param), log a_t (float32 [B, T, W]) and the reset and padding masks [B, T, 1]."""
  gates = jax.nn.sigmoid(gate_logits.astype(jnp.float32))
  gate_x, gate_a = gates[..., 0, :], gates[..., 1, :]
  softplus = jax.nn.softplus(a_param.astype(jnp.float32))
  log_a = -c * gate_a * softplus
  return gate_x, gate_a, softplus, log_a, (positions == 0)[..., None], (positions < 0)[..., None]


def decays_and_inputs(x: jax.Array, gate_logits: jax.Array, a_param: jax.Array, positions: jax.Array,
                      c: float) -> tuple[jax.Array, jax.Array]:
  """Eqs. 1-3 and 4's input term: the decays a_t and inputs sqrt(1 - a_t^2) (i_t x_t), float32 [B, T, W] each,
  with document starts (a = 0, no sqrt factor) and padding (a = 1, no input). Differentiable as written:
  `_rg_lru`'s hand-written backward is tested equal to autodiff through this and the recurrence."""
  gate_x, _, _, log_a, reset, padding = _gates(gate_logits, a_param, positions, c)
  multiplier = jnp.where(reset, 1.0, sqrt_bounded_derivative(-jnp.expm1(2 * log_a), MAX_SQRT_GRADIENT))
  normalized = jnp.where(padding, 0.0, x.astype(jnp.float32) * gate_x * multiplier)
  return _masked_decay(jnp.exp(log_a), reset, padding), normalized


def _masked_decay(decay: jax.Array, reset: jax.Array, padding: jax.Array) -> jax.Array:
  """a_t: 0 at a document start (nothing before it reaches h_t), 1 on padding (the state passes through)."""
  return jnp.where(padding, 1.0, jnp.where(reset, 0.0, decay))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _rg_lru(x: jax.Array, gate_logits: jax.Array, a_param: jax.Array, positions: jax.Array, state: jax.Array,
            c: float, impl: str, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """y [B, T, W] (x's dtype), last state [B, W] float32, with a hand-written backward: the same recurrence run on
  reversed time for the state's cotangents, then the gates' chain rule in elementwise passes and one reduction
  for a_param (residuals: the inputs and h). Against autodiff through the associative scan's transpose: a
  Griffin step at recurrentgemma's bench shape 61.0 -> 58.7 ms on an H200 (same run, docs/performance.md)."""
  return _rg_lru_forward(x, gate_logits, a_param, positions, state, c, impl, chunk_size)[0]


def _rg_lru_forward(x, gate_logits, a_param, positions, state, c, impl, chunk_size):
  h, last = linear_recurrence(*decays_and_inputs(x, gate_logits, a_param, positions, c), state, impl=impl,
                              chunk_size=chunk_size)
  return (h.astype(x.dtype), last), (x, gate_logits, a_param, positions, state, h)


def _rg_lru_backward(c: float, impl: str, chunk_size: int, residuals: tuple, cotangents: tuple) -> tuple:
  x, gate_logits, a_param, positions, state, h = residuals
  d_y, d_last = cotangents                                      # [B, T, W], [B, W]
  gate_x, gate_a, softplus, log_a, reset, padding = _gates(gate_logits, a_param, positions, c)  # recomputed
  decay = jnp.exp(log_a)
  one_minus_a2 = -jnp.expm1(2 * log_a)
  a = _masked_decay(decay, reset, padding)
  # Reverse recurrence for g_t = dL/d(input at t) = d_h_t + a_{t+1} g_{t+1}, run forwards on reversed time.
  d_h = d_y.astype(jnp.float32).at[:, -1].add(d_last)
  a_next = jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)
  g = jnp.flip(linear_recurrence(jnp.flip(a_next, 1), jnp.flip(d_h, 1), impl=impl, chunk_size=chunk_size)[0], 1)
  h_before = jnp.concatenate([state[:, None], h[:, :-1]], axis=1)  # h_{t-1}
  d_state = a[:, 0] * g[:, 0]
  real = ~padding
  d_decay = jnp.where(real & ~reset, g * h_before, 0.0)        # through a = exp(log_a)
  d_input = jnp.where(real, g, 0.0)                             # through the normalized input
  x32 = x.astype(jnp.float32)
  multiplier = jnp.where(reset, 1.0, jnp.sqrt(one_minus_a2))
  d_x = d_input * gate_x * multiplier
  d_gate_x = d_input * x32 * multiplier
  d_multiplier = jnp.where(reset, 0.0, d_input * x32 * gate_x)
  floor = 1.0 / (4.0 * MAX_SQRT_GRADIENT ** 2)                  # sqrt_bounded_derivative's bound
  d_log_a = (d_decay * decay                                    # d(1 - a^2) / d log_a = -2 a^2
             - d_multiplier * jax.lax.rsqrt(jnp.maximum(one_minus_a2, floor)) * jnp.square(decay))
  d_gate_a = -c * softplus * d_log_a
  d_logits = jnp.stack([d_gate_x * gate_x * (1 - gate_x), d_gate_a * gate_a * (1 - gate_a)], axis=-2)
  d_softplus = jnp.sum(-c * gate_a * d_log_a, axis=(0, 1))     # [W]
  d_a_param = d_softplus * jax.nn.sigmoid(a_param.astype(jnp.float32))
  return (d_x.astype(x.dtype), d_logits.astype(gate_logits.dtype), d_a_param.astype(a_param.dtype), None,
          d_state)


_rg_lru.defvjp(_rg_lru_forward, _rg_lru_backward)
