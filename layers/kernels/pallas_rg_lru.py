"""The RG-LRU (De et al. 2024, eqs. 1-4) fused into Pallas Triton kernels for NVIDIA GPUs, forward and backward.

XLA runs the RG-LRU as ~10 elementwise passes over [B, T, W] arrays around an
associative scan (and ~20 for its backward). Here one kernel reads x, the gate
pre-activations and the positions once, computes the gates, decay and input
scale of layers/mixers/rg_lru_gates.py in registers and runs the recurrence, writing y
and the float32 states h (the backward's residual). The backward walks time in
reverse with the same gate maths:

    g_t = dL/dh_t = dy_t + a_{t+1} g_{t+1}      (g_{T-1} = dy_{T-1} + dL/dh_T)

and writes dL/dx, dL/d(gate pre-activations), per-row sums for dL/d a_param and
dL/dh_0 = a_0 g_0.

A program owns one batch row, a block of BLOCK_CHANNELS channels and one chunk
of time, and walks its chunk step by step, ROWS steps per loop iteration (their
loads are in flight together). Chunks make more programs than B x W /
BLOCK_CHANNELS, which is too few to fill a GPU at B = 8 (or B = 2 at T = 8192);
a chunk's entering state is then composed from the chunks before it, each
summarised by a first, cheaper kernel as (product of its decays, its final
state from zero):

    h_enter(j) = P_{j-1} h_enter(j-1) + S_{j-1}

(for the backward the same from the other end). T is padded to whole chunks
with padding positions (a = 1, no input), which leave the state as it is.

Under a mesh each device runs the kernels on its own rows and channels
(jax.shard_map over the batch and `lru` mesh axes). Off GPU they run in
Pallas interpret mode (the tests compare them with the XLA form on CPU).

They are faster than the XLA form (associative scan), alone and in the Griffin
step; docs/performance.md ("The fused RG-LRU kernels") has the measurements.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from layers import sharding
from layers.kernels import kernel_sharding
from layers.mixers.rg_lru_gates import chain_rule, gates, normalized_input

BLOCK_CHANNELS = 64   # channels per program: two warps, one channel per thread (faster than 32; docs/performance.md)
ROWS = 8              # time steps unrolled per loop iteration (faster than 16; docs/performance.md)
TARGET_PROGRAMS = 4096  # time is split until there are this many programs (an H200 has 132 SMs) ...
MAX_CHUNKS = 32         # ... or this many chunks: every program composes the summaries of all of them


def _num_chunks(batch: int, length: int, width: int, min_chunk: int) -> int:
  """Chunks of time per row: doubled while programs are few and chunks stay >= min_chunk steps."""
  chunks = 1
  programs = batch * width // _channel_block(width)
  while chunks < MAX_CHUNKS and programs * chunks < TARGET_PROGRAMS and length >= 2 * chunks * min_chunk:
    chunks *= 2
  return chunks


def _channel_block(width: int) -> int:
  """The largest power of two up to BLOCK_CHANNELS that divides the width (Triton blocks are powers of two)."""
  block = BLOCK_CHANNELS
  while width % block:
    block //= 2
  return block


class _Program:
  """This program's batch row, channels and chunk of time; loads of one step's inputs; walks over its chunk."""

  def __init__(self, x_ref, logits_ref, positions_ref, a_param_ref, c: float, chunks: int):
    """x [B, T, W], logits [B, T, 2 W], positions [B, T], a_param [W]: whole arrays (no BlockSpecs)."""
    self.row, self.chunk = pl.program_id(0), pl.program_id(2)
    block = _channel_block(x_ref.shape[-1])
    self.channels = pl.ds(pl.program_id(1) * block, block)
    self.a_channels = pl.ds(x_ref.shape[-1] + pl.program_id(1) * block, block)  # logits are [.., 2 W]
    self.steps = x_ref.shape[1] // chunks                                       # of this chunk
    self.start = self.chunk * self.steps
    self.logits_ref, self.positions_ref = logits_ref, positions_ref
    self.c = c
    self.softplus = jax.nn.softplus(a_param_ref[self.channels].astype(jnp.float32))  # [block]

  def load_row(self, ref, t) -> jax.Array:
    """ref[b, t, channels] of this program: [block]."""
    return ref[self.row, t, self.channels]

  def gate_inputs(self, t) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Step t's gate pre-activations (input gate, recurrence gate) [block] and position []."""
    return (self.load_row(self.logits_ref, t), self.logits_ref[self.row, t, self.a_channels],
            self.positions_ref[self.row, t])

  def gates(self, logit_x, logit_a, position):
    """Eqs. 1-3: (Gates [block], reset, padding)."""
    reset, padding = position == 0, position < 0
    return gates(logit_x, logit_a, self.softplus, reset, padding, self.c), reset, padding

  def enter(self, decays_ref, states_ref, state, order, before):
    """The state entering this chunk: state <- P_k state + S_k over the chunks k in `order` that are `before` it.
    A static loop over all chunks with a select, so that all the summaries' loads are in flight together."""
    summaries = [(k, decays_ref[self.row, k, self.channels], states_ref[self.row, k, self.channels]) for k in order]
    for k, decay, final in summaries:
      state = jnp.where(before(k), decay * state + final, state)
    return state

  def walk(self, load, step, carry, reverse: bool = False):
    """Over this chunk's steps (backwards if `reverse`), ROWS per iteration: the loads of all ROWS steps first,
    so that they are in flight together, then carry = step(t, loaded, carry) step after step."""
    def rows(i, carry):
      offsets = [i * ROWS + r for r in range(ROWS)]
      times = [self.start + (self.steps - 1 - offset if reverse else offset) for offset in offsets]
      loaded = [load(t) for t in times]
      for t, values in zip(times, loaded):
        carry = step(t, values, carry)
      return carry
    return jax.lax.fori_loop(0, self.steps // ROWS, rows, carry)


def _forward_summary_kernel(x_ref, logits_ref, positions_ref, a_param_ref, decays_ref, states_ref, *, c, chunks):
  """Per chunk from a zero state: the product of its decays and its final state ([B, chunks, W] each)."""
  p = _Program(x_ref, logits_ref, positions_ref, a_param_ref, c, chunks)

  def step(t, loaded, carry):
    x, *gate_inputs = loaded
    product, h = carry
    g, _, padding = p.gates(*gate_inputs)
    return g.a * product, g.a * h + normalized_input(x, g, padding)

  zeros = jnp.zeros_like(p.softplus)
  product, h = p.walk(lambda t: (p.load_row(x_ref, t), *p.gate_inputs(t)), step, (zeros + 1, zeros))
  decays_ref[p.row, p.chunk, p.channels] = product
  states_ref[p.row, p.chunk, p.channels] = h


def _forward_kernel(x_ref, logits_ref, positions_ref, a_param_ref, h0_ref, *refs, c, chunks):
  """y (x's dtype) and h (float32) [B, T, W]; the last state [B, W] from the last chunk."""
  summaries, (y_ref, h_ref, last_ref) = refs[:-3], refs[-3:]
  p = _Program(x_ref, logits_ref, positions_ref, a_param_ref, c, chunks)
  h = h0_ref[p.row, p.channels]
  if summaries:
    h = p.enter(*summaries, h, range(chunks), lambda k: k < p.chunk)

  def step(t, loaded, h):
    x, *gate_inputs = loaded
    g, _, padding = p.gates(*gate_inputs)
    h = g.a * h + normalized_input(x, g, padding)
    y_ref[p.row, t, p.channels] = h.astype(y_ref.dtype)
    h_ref[p.row, t, p.channels] = h
    return h

  h = p.walk(lambda t: (p.load_row(x_ref, t), *p.gate_inputs(t)), step, h)

  @pl.when(p.chunk == chunks - 1)
  def _():
    last_ref[p.row, p.channels] = h


def _backward_summary_kernel(x_ref, logits_ref, positions_ref, a_param_ref, d_y_ref, decays_ref, carries_ref, *,
                             c, chunks):
  """Per chunk, walking back from a zero cotangent: the product of its decays and a_start g_start."""
  p = _Program(x_ref, logits_ref, positions_ref, a_param_ref, c, chunks)

  def load(t):
    _, logit_a, position = p.gate_inputs(t)  # the input gate is not needed here (and its load is dropped)
    return logit_a, position, p.load_row(d_y_ref, t)

  def step(t, loaded, carry):
    logit_a, position, d_y = loaded
    product, after = carry
    g, _, _ = p.gates(jnp.zeros_like(logit_a), logit_a, position)
    return g.a * product, g.a * (d_y.astype(jnp.float32) + after)

  zeros = jnp.zeros_like(p.softplus)
  product, after = p.walk(load, step, (zeros + 1, zeros), reverse=True)
  decays_ref[p.row, p.chunk, p.channels] = product
  carries_ref[p.row, p.chunk, p.channels] = after


def _backward_kernel(x_ref, logits_ref, positions_ref, a_param_ref, h0_ref, h_ref, d_y_ref, d_last_ref, *refs,
                     c, chunks):
  """dL/dx [B, T, W], dL/d logits [B, T, 2 W], per-chunk sums of dL/d softplus [B, chunks, W], dL/dh_0 [B, W]."""
  summaries, (d_x_ref, d_logits_ref, d_softplus_ref, d_h0_ref) = refs[:-4], refs[-4:]
  p = _Program(x_ref, logits_ref, positions_ref, a_param_ref, c, chunks)
  h0 = h0_ref[p.row, p.channels]
  after = d_last_ref[p.row, p.channels]  # a_{t+1} g_{t+1} entering the chunk's last step
  if summaries:
    after = p.enter(*summaries, after, reversed(range(chunks)), lambda k: k > p.chunk)

  def load(t):
    h_before = p.load_row(h_ref, jnp.maximum(t - 1, 0))  # h_0 at t = 0, below
    return (p.load_row(x_ref, t), *p.gate_inputs(t), p.load_row(d_y_ref, t), h_before)

  def step(t, loaded, carry):
    x, logit_x, logit_a, position, d_y, h_before = loaded
    after, d_softplus = carry
    g, reset, padding = p.gates(logit_x, logit_a, position)
    d_h = d_y.astype(jnp.float32) + after
    grads = chain_rule(d_h, jnp.where(t == 0, h0, h_before), x, g, p.softplus, reset, padding, p.c)
    d_x_ref[p.row, t, p.channels] = grads.x.astype(d_x_ref.dtype)
    d_logits_ref[p.row, t, p.channels] = grads.logit_x.astype(d_logits_ref.dtype)
    d_logits_ref[p.row, t, p.a_channels] = grads.logit_a.astype(d_logits_ref.dtype)
    return g.a * d_h, d_softplus + grads.softplus

  after, d_softplus = p.walk(load, step, (after, jnp.zeros_like(p.softplus)), reverse=True)
  d_softplus_ref[p.row, p.chunk, p.channels] = d_softplus

  @pl.when(p.chunk == 0)
  def _():
    d_h0_ref[p.row, p.channels] = after


def _call(kernel, args: tuple, out_shapes: tuple, chunks: int, c: float, name: str):
  """kernel over the grid (rows, channel blocks, chunks); args[0] is x [B, T, W]."""
  batch, _, width = args[0].shape
  block = _channel_block(width)
  return kernel_sharding.triton_call(functools.partial(kernel, c=c, chunks=chunks), out_shapes,
                                     (batch, width // block, chunks), max(1, block // 32), name)(*args)


def _pad_time(length: int, *arrays, positions: jax.Array, chunks: int):
  """Pads T (axis 1) to whole chunks of ROWS-multiples: zeros, and positions -1 (padding)."""
  multiple = chunks * ROWS
  pad = -length % multiple
  if not pad:
    return (*arrays, positions)
  padded = [jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in arrays]
  return (*padded, jnp.pad(positions, [(0, 0), (0, pad)], constant_values=-1))


def _local_forward(x, logits, a_param, positions, h0, c, min_chunk):
  batch, length, width = x.shape
  chunks = _num_chunks(batch, length, width, min_chunk)
  x, flat_logits, positions = _pad_time(length, x, logits.reshape(batch, length, 2 * width), positions=positions,
                                        chunks=chunks)                                      # [B, T', W | 2 W]
  inputs = (x, flat_logits, positions, a_param)
  summary = jax.ShapeDtypeStruct((batch, chunks, width), jnp.float32)
  summaries = () if chunks == 1 else _call(_forward_summary_kernel, inputs, (summary, summary), chunks, c,
                                           'rg_lru_forward_summary')
  series = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  y, h, last = _call(_forward_kernel, (*inputs, h0, *summaries),
                     (jax.ShapeDtypeStruct(x.shape, x.dtype), series, jax.ShapeDtypeStruct(h0.shape, jnp.float32)),
                     chunks, c, 'rg_lru_forward')
  return y[:, :length], h[:, :length], last


def _local_backward(x, logits, a_param, positions, h0, h, d_y, d_last, c, min_chunk):
  batch, length, width = x.shape
  chunks = _num_chunks(batch, length, width, min_chunk)
  x, flat_logits, h, d_y, positions = _pad_time(length, x, logits.reshape(batch, length, 2 * width), h, d_y,
                                                positions=positions, chunks=chunks)  # [B, T', W | 2 W]
  inputs = (x, flat_logits, positions, a_param)
  summary = jax.ShapeDtypeStruct((batch, chunks, width), jnp.float32)
  summaries = () if chunks == 1 else _call(_backward_summary_kernel, (*inputs, d_y), (summary, summary), chunks,
                                           c, 'rg_lru_backward_summary')
  d_x, d_logits, d_softplus, d_h0 = _call(
      _backward_kernel, (*inputs, h0, h, d_y, d_last, *summaries),
      (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(flat_logits.shape, logits.dtype), summary,
       jax.ShapeDtypeStruct(h0.shape, jnp.float32)), chunks, c, 'rg_lru_backward')
  return (d_x[:, :length], d_logits[:, :length].reshape(logits.shape), jnp.sum(d_softplus, axis=1), d_h0)


def _specs(batch: int, width: int):
  """PartitionSpecs of [B, T, W], [B, T, 2, W], [B, T], [W] and [B, W] under the active mesh."""
  rows = kernel_sharding.mesh_axes(sharding.ACT_BATCH, batch)
  lanes = kernel_sharding.mesh_axes(sharding.LRU, width)
  spec = kernel_sharding.spec
  return (spec((rows, (), lanes)), spec((rows, (), (), lanes)), spec((rows, ())), spec((lanes,)),
          spec((rows, lanes)))


def forward(x: jax.Array, gate_logits: jax.Array, a_param: jax.Array, positions: jax.Array, h0: jax.Array,
            c: float, min_chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [B, T, W], gate_logits [B, T, 2, W], a_param [W], positions [B, T], h0 [B, W] float32
  -> y [B, T, W] (x's dtype), h [B, T, W] float32, last state [B, W] float32. Time is split into chunks of
  at least `min_chunk` steps where programs would be fewer than TARGET_PROGRAMS."""
  series, logits, positions_spec, channels, state = _specs(x.shape[0], x.shape[-1])
  return kernel_sharding.run_sharded(functools.partial(_local_forward, c=c, min_chunk=min_chunk),
                                     (x, gate_logits, a_param, positions, h0),
                                     (series, logits, channels, positions_spec, state), (series, series, state))


def backward(x: jax.Array, gate_logits: jax.Array, a_param: jax.Array, positions: jax.Array, h0: jax.Array,
             h: jax.Array, d_y: jax.Array, d_last: jax.Array, c: float, min_chunk: int) -> tuple[jax.Array, ...]:
  """Residuals of `forward` and the cotangents of (y, last) -> dL/dx, dL/d gate_logits (their dtypes),
  dL/d softplus(a_param) [B, W] (summed over time; the caller sums over rows) and dL/dh0 [B, W] float32."""
  series, logits, positions_spec, channels, state = _specs(x.shape[0], x.shape[-1])
  return kernel_sharding.run_sharded(functools.partial(_local_backward, c=c, min_chunk=min_chunk),
                                     (x, gate_logits, a_param, positions, h0, h, d_y, d_last),
                                     (series, logits, channels, positions_spec, state, series, series, state),
                                     (series, logits, state, state))
