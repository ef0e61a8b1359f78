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

The per-position maths and their chain rule are layers/mixers/rg_lru_gates.py; `impl`
picks how the recurrence runs: a form of layers/mixers/linear_recurrence.py around
XLA's elementwise passes, or 'fused', one Pallas Triton kernel each way for
the gates and the scan together on GPU (layers/kernels/pallas_rg_lru.py). 'auto' is
'fused' on GPU and linear_recurrence's choice elsewhere.

`a_param` starts so that a = exp(-softplus(a_param)) lies in [0.9, 0.999],
uniform by area of the ring: a = sqrt(U(0.9^2, 0.999^2)).
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.kernels import kernel_sharding, pallas_rg_lru
from layers.mixers.linear_recurrence import IMPLEMENTATIONS as RECURRENCE_IMPLEMENTATIONS
from layers.mixers.linear_recurrence import linear_recurrence
from layers.mixers.linear_recurrence import resolve_impl as resolve_recurrence_impl
from layers.mixers.rg_lru_gates import MAX_SQRT_GRADIENT, chain_rule, gates, normalized_input, sqrt_bounded_derivative
from layers.param_roles import BIAS, PROJECTION, RECURRENCE, param

IMPLEMENTATIONS = (*RECURRENCE_IMPLEMENTATIONS, 'fused')


def resolve_impl(impl: str) -> str:
  """'auto': the fused kernels on GPU (docs/performance.md), else linear_recurrence's choice for the platform
  compiled for (the Pallas linear scan on TPU, the sequential scan on CPU)."""
  platform = kernel_sharding.checked_platform('RG-LRU', impl, IMPLEMENTATIONS, "'pallas' or 'auto'")
  if impl == 'auto':
    return 'fused' if platform == 'gpu' else resolve_recurrence_impl(impl)
  return impl


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
    self.kernel = param(sharding.partitioned(init, (None, None, None, None))(
        rngs.params(), (num_outputs, num_blocks, block, block), param_dtype), PROJECTION)
    self.bias = param(sharding.partitioned(nnx.initializers.zeros, (None, None, None))(
        None, (num_outputs, num_blocks, block), param_dtype), BIAS)

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., W] -> [..., G, W]
    blocks = x.astype(self.dtype).reshape(*x.shape[:-1], self.num_blocks, -1)
    y = jnp.einsum('...hi,ghij->...ghj', blocks, self.kernel[...].astype(self.dtype))
    y = y + self.bias[...].astype(self.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-3], x.shape[-1])


class RGLRU(nnx.Module):
  """Eqs. 1-4 on x [B, T, W] with block-diagonal gates. `impl`: see the module docstring; `chunk_size`: the
  fewest steps a program of the fused kernels walks when they split time."""

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
    self.a_param = param(sharding.partitioned(a_param_init(min_rad, max_rad), (sharding.LRU,))(
        rngs.params(), (width,), param_dtype), RECURRENCE)

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
  impl = resolve_impl(impl)
  if impl == 'fused' and x.shape[1] == 1:
    impl = 'sequential'  # one decode step: no kernel to launch
  if state is None:
    state = jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32)
  return _rg_lru(x, gate_logits, a_param, positions, state.astype(jnp.float32), c, impl, chunk_size)


def _gates(gate_logits: jax.Array, a_param: jax.Array, positions: jax.Array, c: float, sqrt=jnp.sqrt):
  """Eqs. 1-3 on [B, T, 2, W] pre-activations: (Gates [B, T, W], softplus [W], reset and padding [B, T, 1])."""
  softplus = jax.nn.softplus(a_param.astype(jnp.float32))
  reset, padding = (positions == 0)[..., None], (positions < 0)[..., None]
  g = gates(gate_logits[..., 0, :], gate_logits[..., 1, :], softplus, reset, padding, c, sqrt)
  return g, softplus, reset, padding


def decays_and_inputs(x: jax.Array, gate_logits: jax.Array, a_param: jax.Array, positions: jax.Array,
                      c: float) -> tuple[jax.Array, jax.Array]:
  """Eqs. 1-3 and 4's input term: the decays a_t and inputs sqrt(1 - a_t^2) (i_t x_t), float32 [B, T, W] each,
  with document starts (a = 0, no sqrt factor) and padding (a = 1, no input). Differentiable as written:
  `_rg_lru`'s hand-written backward is tested equal to autodiff through this and the recurrence."""
  bounded_sqrt = functools.partial(sqrt_bounded_derivative, max_gradient=MAX_SQRT_GRADIENT)
  g, _, _, padding = _gates(gate_logits, a_param, positions, c, bounded_sqrt)
  return g.a, normalized_input(x, g, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _rg_lru(x: jax.Array, gate_logits: jax.Array, a_param: jax.Array, positions: jax.Array, state: jax.Array,
            c: float, impl: str, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """y [B, T, W] (x's dtype), last state [B, W] float32, with a hand-written backward: the same recurrence run on
  reversed time for the state's cotangents, then the gates' chain rule (residuals: the inputs and h), by the
  fused kernels or in XLA. The XLA backward is faster than autodiff through the associative scan's transpose
  (the Griffin step, docs/performance.md)."""
  return _rg_lru_forward(x, gate_logits, a_param, positions, state, c, impl, chunk_size)[0]


def _rg_lru_forward(x, gate_logits, a_param, positions, state, c, impl, chunk_size):
  if impl == 'fused':
    y, h, last = pallas_rg_lru.forward(x, gate_logits, a_param, positions, state, c, chunk_size)
  else:
    h, last = linear_recurrence(*decays_and_inputs(x, gate_logits, a_param, positions, c), state, impl=impl)
    y = h.astype(x.dtype)
  return (y, last), (x, gate_logits, a_param, positions, state, h)


def _rg_lru_backward(c: float, impl: str, chunk_size: int, residuals: tuple, cotangents: tuple) -> tuple:
  x, gate_logits, a_param, positions, state, h = residuals
  d_y, d_last = cotangents                                      # [B, T, W], [B, W]
  if impl == 'fused':
    d_x, d_logits, d_softplus, d_state = pallas_rg_lru.backward(x, gate_logits, a_param, positions, state, h, d_y,
                                                                d_last, c, chunk_size)
    d_softplus = jnp.sum(d_softplus, axis=0)
  else:
    d_x, d_logits, d_softplus, d_state = _xla_backward(x, gate_logits, a_param, positions, state, h, d_y, d_last, c,
                                                       impl)
  d_a_param = d_softplus * jax.nn.sigmoid(a_param.astype(jnp.float32))
  return (d_x.astype(x.dtype), d_logits.astype(gate_logits.dtype), d_a_param.astype(a_param.dtype), None, d_state)


def _xla_backward(x, gate_logits, a_param, positions, state, h, d_y, d_last, c, impl):
  """The reverse recurrence g_t = dL/dh_t = dy_t + a_{t+1} g_{t+1} by linear_recurrence on reversed time, then
  the chain rule elementwise: (dL/dx, dL/d gate_logits, dL/d softplus(a_param) [W], dL/d state)."""
  g, softplus, reset, padding = _gates(gate_logits, a_param, positions, c)  # recomputed
  d_h = d_y.astype(jnp.float32).at[:, -1].add(d_last)
  a_next = jnp.concatenate([g.a[:, 1:], jnp.zeros_like(g.a[:, :1])], axis=1)
  d_h = jnp.flip(linear_recurrence(jnp.flip(a_next, 1), jnp.flip(d_h, 1), impl=impl)[0], 1)
  h_before = jnp.concatenate([state[:, None], h[:, :-1]], axis=1)  # h_{t-1}
  grads = chain_rule(d_h, h_before, x, g, softplus, reset, padding, c)
  d_logits = jnp.stack([grads.logit_x, grads.logit_a], axis=-2)
  return grads.x, d_logits, jnp.sum(grads.softplus, axis=(0, 1)), g.a[:, 0] * d_h[:, 0]


_rg_lru.defvjp(_rg_lru_forward, _rg_lru_backward)
