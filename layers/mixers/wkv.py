"""The RWKV-6 ("Finch") wkv operator: linear attention with a per-channel, data-dependent decay.

For each head, with a matrix state S [d_k, d_v] (float32) and inputs r_t, k_t,
w_t in R^{d_k}, v_t in R^{d_v} (Peng et al. 2024, "Eagle and Finch", eq. 19-20):

    y_t = r_t (S_{t-1} + diag(u) k_t^T v_t)        u: the per-channel "bonus" (None = 0)
    S_t = diag(w_t) S_{t-1} + k_t^T v_t              w_t = exp(log_w_t), log_w_t <= 0

A document start (`reset`) empties the state first (S_{t-1} := 0). Unrolled,
with G_t = sum_{r<=t} log_w_r (per channel, inclusive):

    y_t = sum_{s<t, same document} sum_c r_tc k_sc exp(G_{t-1,c} - G_{s,c}) v_s
          + (r_t . (u * k_t)) v_t + [no reset in 1..t] (r_t * exp(G_{t-1})) S_0.

Three forms compute that one function, the decode step is a fourth:

  recurrent_wkv  lax.scan of `wkv_step` over T (the reference; decode is one step)
  chunked_wkv    chunks of C tokens: matmuls inside a chunk, a scan of T / C steps
                 across chunks carries the state (training, prefill)
  fused_wkv      the chunked form as Pallas Triton kernels, forward and backward
                 (layers/kernels/pallas_wkv.py; GPUs; 'auto' picks it there)

Numerical stability of the chunked form. Every exponent it takes is a decay
between two points of the chunk taken forwards in time, so it is <= 0: nothing
is ever divided by a cumulative decay (exp(-G) overflows as soon as decays are
strong; exp(G) alone underflows). The pairs (t, s) inside a chunk are split by
sub-chunks of c tokens (C = m c): for s in an earlier sub-chunk than t, with
p the first index of t's sub-chunk,

    exp(G_{t-1} - G_s) = exp(G_{t-1} - G_{p-1}) * exp(G_{p-1} - G_s),

both factors <= 1 (a query scaling and, per query sub-chunk, a key scaling:
a matmul); the pairs inside one sub-chunk take the exponent directly ([c, c, d_k]
elements). A factor that underflows to 0 only drops a term whose true weight
is below float32's smallest normal number. The state and all accumulation are
float32 whatever the input dtype.

Inputs: r, k, log_w [B, T, N, d_k], v [B, T, N, d_v], u [N, d_k] or None,
reset [B, T] bool, initial state [B, N, d_k, d_v] or None (zeros). Outputs:
y [B, T, N, d_v] float32 and the final state. Padding is the caller's: a step
with k = 0 and log_w = 0 leaves the state as it was.
"""
import functools
import math

import jax
import jax.numpy as jnp

from layers.kernels import kernel_sharding
from layers.kernels.pallas_wkv import fused_wkv
from layers.kernels.pallas_wkv import supports as fused_wkv_supports

IMPLEMENTATIONS = ('auto', 'chunked', 'fused', 'recurrent')


def _f32(*xs):
  return tuple(None if x is None else x.astype(jnp.float32) for x in xs)


def wkv_step(state, r, k, v, log_w, u, reset):
  """One token: state [B, N, K, V]; r, k, log_w [B, N, K]; v [B, N, V]; reset [B] -> (y [B, N, V], state)."""
  r, k, v, log_w, u, state = _f32(r, k, v, log_w, u, state)
  state = jnp.where(reset[:, None, None, None], 0.0, state)
  y = jnp.einsum('bnk,bnkv->bnv', r, state)
  if u is not None:
    y = y + jnp.sum(r * u * k, axis=-1, keepdims=True) * v
  state = jnp.exp(log_w)[..., None] * state + k[..., :, None] * v[..., None, :]
  return y, state


def _zero_state(r, v, initial_state):
  batch, _, heads, d_k = r.shape
  if initial_state is None:
    return jnp.zeros((batch, heads, d_k, v.shape[-1]), jnp.float32)
  return initial_state.astype(jnp.float32)


@jax.jit
def recurrent_wkv(r, k, v, log_w, u, reset, initial_state=None):
  """Token by token (a lax.scan over T of `wkv_step`)."""
  state0 = _zero_state(r, v, initial_state)

  def step(state, inputs):
    y, state = wkv_step(state, *inputs[:4], u, inputs[4])
    return state, y

  time_major = tuple(jnp.moveaxis(x, 1, 0) for x in (r, k, v, log_w, reset))
  final, y = jax.lax.scan(step, state0, time_major)
  return jnp.moveaxis(y, 0, 1), final


def _within_chunks(r, k, v, log_w, u, reset, sub):
  """Each chunk from a zero state. Arrays [..., C, N, X] (leading axes: batch and chunk).

  Returns y [..., C, N, V] (zero initial state), the query for the incoming state
  r * exp(G_{t-1}) (zero after a reset) [..., C, N, K], the chunk's end state from
  zero [..., N, K, V] and the factor by which an incoming state survives the chunk [..., N, K].
  """
  length = r.shape[-3]
  m = length // sub
  heads_first = lambda x: jnp.moveaxis(x, -2, -3)  # [..., C, N, X] -> [..., N, C, X]
  r, k, v, log_w = map(heads_first, (r, k, v, log_w))
  g = jnp.cumsum(log_w, axis=-2)                                              # G_t, inclusive
  g_ex = jnp.concatenate([jnp.zeros_like(g[..., :1, :]), g[..., :-1, :]], axis=-2)  # G_{t-1}
  segment = jnp.cumsum(reset.astype(jnp.int32), axis=-1)                      # [..., C]
  same = segment[..., :, None] == segment[..., None, :]                      # [..., C, C]

  blocked = lambda x: x.reshape(*x.shape[:-2], m, sub, x.shape[-1])           # [..., N, m, c, X]
  same_blocked = same.reshape(*same.shape[:-2], m, sub, length)[..., None, :, :, :]  # [..., 1, m, c, C]
  y = 0.0
  if m > 1:  # pairs in earlier sub-chunks: reference point p-1 (the end of the previous sub-chunk)
    g_ref = g_ex[..., ::sub, :]                                               # [..., N, m, K]
    q_inter = blocked(r) * jnp.exp(blocked(g_ex) - g_ref[..., None, :])      # [..., N, m, c, K]
    earlier = jnp.arange(length)[None, :] < (jnp.arange(m) * sub)[:, None]   # [m, C]: s before sub-chunk i
    key_gap = jnp.where(earlier[:, :, None], g_ref[..., :, None, :] - g[..., None, :, :], -jnp.inf)
    k_inter = k[..., None, :, :] * jnp.exp(key_gap)                           # [..., N, m, C, K]
    inter = jnp.einsum('...ick,...isk->...ics', q_inter, k_inter)            # [..., N, m, c, C]
    y = jnp.einsum('...ics,...sv->...icv', jnp.where(same_blocked, inter, 0.0), v)
  # Pairs inside one sub-chunk (s < t): the exponent taken directly.
  strict = jnp.tril(jnp.ones((sub, sub), bool), -1)
  gap = jnp.where(strict[:, :, None], blocked(g_ex)[..., :, None, :] - blocked(g)[..., None, :, :], -jnp.inf)
  diagonal = jnp.einsum('...tk,...sk,...tsk->...ts', blocked(r), blocked(k), jnp.exp(gap))  # [..., N, m, c, c]
  same_diagonal = jnp.stack([same_blocked[..., i, :, i * sub:(i + 1) * sub] for i in range(m)], axis=-3)
  diagonal = jnp.where(same_diagonal, diagonal, 0.0)                         # no pair across a document start
  y = y + jnp.einsum('...its,...isv->...itv', diagonal, blocked(v))
  y = y.reshape(*y.shape[:-3], length, y.shape[-1])                            # [..., N, C, V]
  if u is not None:
    y = y + jnp.sum(r * u[:, None, :] * k, axis=-1, keepdims=True) * v        # the bonus: s = t
  y = jnp.moveaxis(y, -3, -2)                                                 # [..., C, N, V]

  first = (segment == 0)[..., None, :, None]                                  # [..., 1, C, 1]
  q_state = jnp.where(first, r * jnp.exp(g_ex), 0.0)
  in_last = (segment == segment[..., -1:])[..., None, :, None]
  to_end = jnp.exp(jnp.where(in_last, g[..., -1:, :] - g, -jnp.inf))         # [..., N, C, K]
  end_state = jnp.einsum('...nsk,...nsv->...nkv', k * to_end, v)
  survival = jnp.where((segment[..., -1] == 0)[..., None, None], jnp.exp(g[..., -1, :]), 0.0)  # [..., N, K]
  return y, jnp.moveaxis(q_state, -3, -2), end_state, survival


@functools.partial(jax.jit, static_argnames=('chunk_size', 'sub_chunk_size'))
def chunked_wkv(r, k, v, log_w, u, reset, initial_state=None, *, chunk_size: int = 64, sub_chunk_size: int = 16):
  """Matmuls inside chunks of `chunk_size` tokens (any T: the tail is padded with identity steps)."""
  r, k, v, log_w, u = _f32(r, k, v, log_w, u)
  batch, length, heads, d_k = r.shape
  d_v = v.shape[-1]
  chunk = max(1, min(chunk_size, length))
  sub = math.gcd(chunk, max(1, sub_chunk_size))
  num_chunks = -(-length // chunk)
  extra = num_chunks * chunk - length
  if extra:  # identity steps: no input, no decay, no reset
    pad = lambda x: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))
    r, k, v, log_w, reset = map(pad, (r, k, v, log_w, reset))
  fold = lambda x: x.reshape(batch, num_chunks, chunk, *x.shape[2:])
  y, q_state, end_state, survival = _within_chunks(*map(fold, (r, k, v, log_w)), u, fold(reset), sub)

  def across(state, inputs):
    chunk_end, chunk_survival = inputs
    return chunk_survival[..., None] * state + chunk_end, state  # emits the state entering the chunk

  state0 = _zero_state(r, v, initial_state)
  if num_chunks == 1:  # no scan to compile
    final, entering = across(state0, (end_state[:, 0], survival[:, 0]))
    entering = entering[:, None]
  else:
    final, entering = jax.lax.scan(across, state0, (jnp.moveaxis(end_state, 1, 0), jnp.moveaxis(survival, 1, 0)))
    entering = jnp.moveaxis(entering, 0, 1)                                   # [B, n, N, K, V]
  y = y + jnp.einsum('bjtnk,bjnkv->bjtnv', q_state, entering)
  return y.reshape(batch, num_chunks * chunk, heads, d_v)[:, :length], final


def resolve_impl(impl: str, d_k: int, d_v: int, chunk_size: int) -> str:
  """'auto': the fused kernels on GPU where they take the sizes (powers of two >= 16), else 'chunked'."""
  platform = kernel_sharding.checked_platform('wkv', impl, IMPLEMENTATIONS, "'chunked' or 'auto'")
  if impl == 'auto':
    return 'fused' if platform == 'gpu' and fused_wkv_supports(d_k, d_v, chunk_size) else 'chunked'
  return impl


def wkv(r, k, v, log_w, u, reset, initial_state=None, *, impl: str = 'auto', chunk_size: int = 64):
  """Dispatches on `impl` (see resolve_impl); one token is always `wkv_step`."""
  impl = resolve_impl(impl, r.shape[-1], v.shape[-1], chunk_size)
  if r.shape[1] == 1:
    y, state = wkv_step(_zero_state(r, v, initial_state), r[:, 0], k[:, 0], v[:, 0], log_w[:, 0], u, reset[:, 0])
    return y[:, None], state
  if impl == 'recurrent':
    return recurrent_wkv(r, k, v, log_w, u, reset, initial_state)
  if impl == 'fused':
    return fused_wkv(r, k, v, log_w, u, reset, initial_state, chunk_size=chunk_size)
  return chunked_wkv(r, k, v, log_w, u, reset, initial_state, chunk_size=chunk_size)
