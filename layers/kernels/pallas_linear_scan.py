"""Diagonal linear recurrence h_t = a_t * h_{t-1} + x_t as a Pallas TPU kernel.

A linear scan, one time step after the other (the Griffin paper found a linear
scan faster than an associative one on TPU, and a Pallas one faster than
JAX's: the recurrence is memory-bound; docs/architectures.md, Griffin). The grid
runs over blocks of batch rows and channels (independent, 'parallel') and,
last and in order ('arbitrary'), over chunks of time; inside a chunk a loop
walks the time steps. Everything is float32 (other dtypes are cast on the way
in and out: Mosaic loads one time step of a packed bf16 tile only at aligned
offsets); the state [rows, 1, channels] is carried by the loop within a chunk
and in VMEM scratch from one chunk to the next.

Gradient (custom_vjp), with g_t = dL/dh_t counting every later step:

    g_t = dh_t + a_{t+1} g_{t+1}   (g_{T-1} = dh_{T-1} + d h_last)
    dL/dx_t = g_t,   dL/da_t = g_t h_{t-1},   dL/dh_0 = a_0 g_0

a reverse linear recurrence, run by the same kernel walking time backwards
(emit g_t = carry + dh_t, then carry = a_t g_t: its last state is dL/dh_0).
Under a mesh each device scans its own rows and channels (jax.shard_map over
the batch and `lru` mesh axes). Off TPU the kernel runs in interpret mode.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from layers import sharding
from layers.kernels import kernel_sharding

# One block of a, x or h is at most 8 x 128 x 256 float32 = 1 MiB; with double buffering the
# kernel holds 6 MiB of VMEM (the scoped limit is 16 MiB: 512 lanes x 256 steps did not compile).
BLOCK_TIME = 128             # time steps per chunk (a multiple of 8 sublanes)
BLOCK_CHANNELS = (256, 128)  # the largest dividing the channels (lanes), else all of them
BLOCK_ROWS = 8               # batch rows per block: the largest divisor of B up to this


def _scan_kernel(a_ref, x_ref, h0_ref, h_ref, last_ref, state_ref, *, reverse: bool):
  """a/x/h refs [rows, chunk, channels]; h0/last/state (VMEM scratch) [rows, 1, channels]; all float32."""
  chunk = a_ref.shape[1]

  @pl.when(pl.program_id(2) == 0)
  def _():
    state_ref[...] = h0_ref[...]

  def step(i, h):  # h [rows, 1, channels]
    t = chunk - 1 - i if reverse else i
    a_t, x_t = a_ref[:, pl.ds(t, 1), :], x_ref[:, pl.ds(t, 1), :]
    if reverse:  # emit g_t = a_{t+1} g_{t+1} + dh_t, carry a_t g_t
      g = h + x_t
      h_ref[:, pl.ds(t, 1), :] = g
      return a_t * g
    h = a_t * h + x_t
    h_ref[:, pl.ds(t, 1), :] = h
    return h

  state_ref[...] = jax.lax.fori_loop(0, chunk, step, state_ref[...], unroll=8 if chunk % 8 == 0 else 1)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _():
    last_ref[...] = state_ref[...]


def _blocks(batch: int, length: int, channels: int) -> tuple[int, int, int]:
  """(rows, chunk, channels) of one block; the chunk must divide the length."""
  chunk = min(BLOCK_TIME, length)
  if length % chunk:
    raise ValueError(f'pallas linear scan: length {length} is not a multiple of the time block {chunk}')
  rows = max(r for r in range(1, BLOCK_ROWS + 1) if batch % r == 0)
  lanes = next((c for c in BLOCK_CHANNELS if channels % c == 0), channels)
  return rows, chunk, lanes


def _scan(a: jax.Array, x: jax.Array, h0: jax.Array, reverse: bool, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """a, x [B, T, C], h0 [B, C] float32 -> h [B, T, C], last state [B, C] (reverse: time walked backwards)."""
  batch, length, channels = x.shape
  rows, chunk, lanes = _blocks(batch, length, channels)
  num_chunks = length // chunk

  def time_block(b, c, s):
    return b, num_chunks - 1 - s if reverse else s, c

  series = pl.BlockSpec((rows, chunk, lanes), time_block)
  state = pl.BlockSpec((rows, 1, lanes), lambda b, c, s: (b, 0, c))
  h, last = pl.pallas_call(
      functools.partial(_scan_kernel, reverse=reverse),
      out_shape=(jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct((batch, 1, channels), jnp.float32)),
      grid=(batch // rows, channels // lanes, num_chunks),
      in_specs=[series, series, state],
      out_specs=(series, state),
      scratch_shapes=[pltpu.VMEM((rows, 1, lanes), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name='linear_scan_reverse' if reverse else 'linear_scan',
  )(a, x, h0[:, None])
  return h, last[:, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _linear_scan(a: jax.Array, x: jax.Array, h0: jax.Array, interpret: bool) -> tuple[jax.Array, jax.Array]:
  return _scan(a, x, h0, False, interpret)


def _linear_scan_forward(a, x, h0, interpret):
  h, last = _scan(a, x, h0, False, interpret)
  return (h, last), (a, h0, h)


def _linear_scan_backward(interpret, residuals, cotangents):
  a, h0, h = residuals
  dh, dlast = cotangents
  g, dh0 = _scan(a, dh, dlast, True, interpret)  # g [B, T, C]: dL/dh_t through every later step
  h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)  # [B, T, C]: h_{t-1}
  return g * h_prev, g, dh0


_linear_scan.defvjp(_linear_scan_forward, _linear_scan_backward)


def linear_scan(a: jax.Array, x: jax.Array, h0: jax.Array) -> tuple[jax.Array, jax.Array]:
  """a, x [B, T, C], h0 [B, C], one dtype; T a multiple of BLOCK_TIME or at most it -> (h [B, T, C], h_T [B, C])."""
  batch, _, channels = x.shape
  dtype = x.dtype
  interpret = kernel_sharding.compile_platform() != 'tpu'
  rows = kernel_sharding.mesh_axes(sharding.ACT_BATCH, batch)
  lanes = kernel_sharding.mesh_axes(sharding.LRU, channels)
  series, state = kernel_sharding.spec((rows, (), lanes)), kernel_sharding.spec((rows, lanes))
  h, last = kernel_sharding.run_sharded(lambda a, x, h0: _linear_scan(a, x, h0, interpret),
                                        tuple(v.astype(jnp.float32) for v in (a, x, h0)),
                                        (series, series, state), (series, state))
  return h.astype(dtype), last.astype(dtype)
