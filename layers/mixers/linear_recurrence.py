"""Diagonal linear recurrence h_t = a_t * h_{t-1} + x_t over the time axis.

The core of the RG-LRU (and of any gated linear RNN with a per-channel decay).
Inputs are [B, T, ...] with time on axis 1 and an initial state h_0 [B, ...];
the result is every h_t and the last state. A zero a_t is a reset: nothing
before t reaches h_t. Three implementations behind `impl`, equal up to
float rounding (values and gradients):

  'sequential'   jax.lax.scan over T (the reference)
  'associative'  jax.lax.associative_scan with (a1, x1) . (a2, x2) = (a1 a2, a2 x1 + x2),
                 log-depth (Blelloch 1990; Martin & Cundy 2018)
  'pallas'       a linear scan as a Pallas TPU kernel (layers/kernels/pallas_linear_scan.py;
                 its gradient is the reverse scan by the same kernel); Pallas
                 interpret mode off TPU. T is padded to whole time blocks with
                 a = 1, x = 0, which leave the state as it is.

'auto' picks one for the platform compiled for (resolve_impl). Computation happens in the
dtype the inputs promote to; the RG-LRU passes float32.
"""
import math

import jax
import jax.numpy as jnp

from layers.kernels import kernel_sharding, pallas_linear_scan

IMPLEMENTATIONS = ('sequential', 'associative', 'pallas', 'auto')


def resolve_impl(impl: str) -> str:
  """'auto': associative on GPU (faster there than a linear or a two-level chunked scan: docs/performance.md,
  "Peers measured on their own"), the Pallas linear scan on TPU (the Griffin paper found a linear scan fastest
  there: docs/architectures.md, Griffin), sequential elsewhere (cheapest to compile on CPU). The platform is
  the one compiled for (kernel_sharding.compile_platform)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'unknown linear recurrence impl {impl!r}; known: {IMPLEMENTATIONS}')
  if impl == 'auto':
    return {'gpu': 'associative', 'tpu': 'pallas'}.get(kernel_sharding.compile_platform(), 'sequential')
  return impl


def _combine(left: tuple[jax.Array, jax.Array], right: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Composes h -> a_l h + x_l, then h -> a_r h + x_r."""
  a_left, x_left = left
  a_right, x_right = right
  return a_left * a_right, a_right * x_left + x_right


def _sequential(a: jax.Array, x: jax.Array, h0: jax.Array) -> tuple[jax.Array, jax.Array]:
  def step(h, inputs):
    a_t, x_t = inputs
    h = a_t * h + x_t
    return h, h

  last, h = jax.lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(x, 1, 0)))
  return jnp.moveaxis(h, 0, 1), last


def _associative(a: jax.Array, x: jax.Array, h0: jax.Array) -> tuple[jax.Array, jax.Array]:
  x = x.at[:, 0].add(a[:, 0] * h0)  # h_0' = a_0 h_0 + x_0: the initial state folded into the first input
  _, h = jax.lax.associative_scan(_combine, (a, x), axis=1)
  return h, h[:, -1]


def _pad_time(a: jax.Array, x: jax.Array, multiple: int) -> tuple[jax.Array, jax.Array]:
  """Pads T up to a multiple with a = 1, x = 0: steps that leave the state as it is."""
  pad = -a.shape[1] % multiple
  if not pad:
    return a, x
  widths = [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)
  return jnp.pad(a, widths, constant_values=1), jnp.pad(x, widths)


def _pallas(a: jax.Array, x: jax.Array, h0: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The kernel over channels flattened to one axis, T padded to whole time blocks."""
  batch, length, *rest = a.shape
  channels = math.prod(rest)
  a, x = _pad_time(a, x, min(pallas_linear_scan.BLOCK_TIME, length))
  h, last = pallas_linear_scan.linear_scan(a.reshape(batch, -1, channels), x.reshape(batch, -1, channels),
                                           h0.reshape(batch, channels))
  return h[:, :length].reshape(batch, length, *rest), last.reshape(h0.shape)


def linear_recurrence(a: jax.Array, x: jax.Array, h0: jax.Array | None = None, *,
                      impl: str = 'auto') -> tuple[jax.Array, jax.Array]:
  """a, x [B, T, ...], h0 [B, ...] or None (zeros) -> (h [B, T, ...], h_T [B, ...])."""
  impl = resolve_impl(impl)
  if a.shape != x.shape:
    raise ValueError(f'a {a.shape} and x {x.shape} must have the same shape')
  dtype = jnp.result_type(a, x) if h0 is None else jnp.result_type(a, x, h0)
  a, x = a.astype(dtype), x.astype(dtype)
  h0 = jnp.zeros((x.shape[0], *x.shape[2:]), dtype) if h0 is None else h0.astype(dtype)
  if x.shape[1] == 1:  # one decode step: every form is this
    h = a[:, 0] * h0 + x[:, 0]
    return h[:, None], h
  if impl == 'sequential':
    return _sequential(a, x, h0)
  if impl == 'associative':
    return _associative(a, x, h0)
  return _pallas(a, x, h0)
