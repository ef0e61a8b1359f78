"""Gated retention: linear attention with one data-dependent decay per head and token.

For each head (Sun et al. 2024, YOCO eq. 6-8):

    S_t = gamma_t S_{t-1} + k_t^T v_t        (S: [d_k, d_v], float32)
    o_t = q_t S_t

with gamma_t = exp(log_decay_t) in (0, 1]. A document start (`reset`) empties
the state first: S_t = k_t^T v_t. Unrolled, with G_t = sum_{r<=t} log_decay_r,

    o_t = sum_{s<=t, same document} (q_t . k_s) exp(G_t - G_s) v_s
          + [no reset in 1..t] exp(G_t) q_t S_0,

three forms compute that one function:

  parallel_retention   the masked decay matrix over all T x T pairs (the reference)
  chunked_retention    the same inside chunks of C tokens (matmuls), and the state
                       carried across chunks by a scan of T / C steps (training, prefill)
  recurrent_retention  the recurrence token by token (decode: `retention_step`)

Inputs are [B, T, N, H] (q, k: H = d_k; v: d_v), log_decay [B, T, N] and reset
[B, T] bool; every form returns (o [B, T, N, d_v] float32, final state
[B, N, d_k, d_v] float32). Each is jitted (inlined when called under a jit;
one compiled program, not op-by-op dispatch, when called eagerly). Padding is the caller's business: a step with
k = 0 and log_decay = 0 leaves the state as it was (see gated_retention.py).
"""
import functools

import jax
import jax.numpy as jnp


def _within(q, k, v, log_decay, reset):
  """Zero initial state: outputs, final state, and how much of an initial state reaches each token.

  Returns o [B, T, N, V], end state [B, N, K, V] and survival [B, T, N]:
  exp(G_t) where no reset happened in 1..t, else 0.
  """
  length = q.shape[1]
  g = jnp.cumsum(log_decay.astype(jnp.float32), axis=1)             # [B, T, N]
  segment = jnp.cumsum(reset.astype(jnp.int32), axis=1)             # [B, T]
  causal = jnp.tril(jnp.ones((length, length), bool))
  visible = causal & (segment[:, :, None] == segment[:, None, :])   # [B, T, S]
  g_heads = jnp.moveaxis(g, 2, 1)                                   # [B, N, T]
  gap = g_heads[:, :, :, None] - g_heads[:, :, None, :]             # [B, N, T, S]
  decay = jnp.exp(jnp.where(visible[:, None], gap, -jnp.inf))       # where before exp: no inf in gradients
  scores = jnp.einsum('btnk,bsnk->bnts', q, k, preferred_element_type=jnp.float32) * decay
  o = jnp.einsum('bnts,bsnv->btnv', scores.astype(v.dtype), v, preferred_element_type=jnp.float32)
  # State after the last token: the last document's tokens, decayed to the end.
  in_last = segment == segment[:, -1:]                              # [B, T]
  to_end = jnp.exp(jnp.where(in_last[..., None], g[:, -1:] - g, -jnp.inf))  # [B, T, N]
  end_state = jnp.einsum('bsnk,bsnv->bnkv', k, (v * to_end[..., None].astype(v.dtype)).astype(v.dtype),
                         preferred_element_type=jnp.float32)
  survival = jnp.where((segment == 0)[..., None], jnp.exp(g), 0.0)  # [B, T, N]
  return o, end_state, survival


def _add_initial_state(o, end_state, survival, q, initial_state):
  """Adds what an initial state S_0 [B, N, K, V] contributes to the outputs and the final state."""
  if initial_state is None:
    return o, end_state
  from_state = jnp.einsum('btnk,bnkv->btnv', q.astype(jnp.float32), initial_state)
  o = o + survival[..., None] * from_state
  end_state = end_state + survival[:, -1, :, None, None] * initial_state
  return o, end_state


@jax.jit
def parallel_retention(q, k, v, log_decay, reset, initial_state=None):
  """The whole row at once: a [T, T] decay matrix per head. Memory O(T^2); the test reference."""
  o, end_state, survival = _within(q, k, v, log_decay, reset)
  return _add_initial_state(o, end_state, survival, q, initial_state)


@functools.partial(jax.jit, static_argnames='chunk_size')
def chunked_retention(q, k, v, log_decay, reset, initial_state=None, *, chunk_size: int):
  """Parallel inside chunks of `chunk_size` tokens, a scan over chunks in between (any T)."""
  batch, length, heads, d_k = q.shape
  d_v = v.shape[-1]
  chunk = max(1, min(chunk_size, length))
  num_chunks = -(-length // chunk)
  if num_chunks == 1:  # one chunk is the parallel form (no scan to compile)
    return parallel_retention(q, k, v, log_decay, reset, initial_state)
  extra = num_chunks * chunk - length
  if extra:  # identity steps at the end: no input, no decay, no reset
    pad = lambda x: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))
    q, k, v, log_decay, reset = map(pad, (q, k, v, log_decay, reset))

  def fold(x):  # [B, n * C, ...] -> [B * n, C, ...]
    return x.reshape(batch * num_chunks, chunk, *x.shape[2:])

  o, end_state, survival = _within(*map(fold, (q, k, v, log_decay, reset)))
  end_state = end_state.reshape(batch, num_chunks, heads, d_k, d_v)
  carry = survival.reshape(batch, num_chunks, chunk, heads)[:, :, -1]  # [B, n, N]: S survives the chunk by this

  def across(state, inputs):
    chunk_state, chunk_carry = inputs
    return chunk_carry[..., None, None] * state + chunk_state, state  # emit the state entering the chunk

  state0 = (jnp.zeros((batch, heads, d_k, d_v), jnp.float32) if initial_state is None
            else initial_state.astype(jnp.float32))
  final_state, entering = jax.lax.scan(
      across, state0, (jnp.moveaxis(end_state, 1, 0), jnp.moveaxis(carry, 1, 0)))
  entering = jnp.moveaxis(entering, 0, 1).reshape(batch * num_chunks, heads, d_k, d_v)
  from_state = jnp.einsum('btnk,bnkv->btnv', fold(q).astype(jnp.float32), entering)
  o = (o + survival[..., None] * from_state).reshape(batch, num_chunks * chunk, heads, d_v)
  return o[:, :length], final_state


@jax.jit
def retention_step(state, q, k, v, log_decay, reset):
  """One token: state [B, N, K, V] f32, q/k [B, N, K], v [B, N, V], log_decay [B, N], reset [B] -> (o, state)."""
  gamma = jnp.where(reset[:, None], 0.0, jnp.exp(log_decay.astype(jnp.float32)))
  state = gamma[..., None, None] * state + jnp.einsum('bnk,bnv->bnkv', k.astype(jnp.float32), v.astype(jnp.float32))
  return jnp.einsum('bnk,bnkv->bnv', q.astype(jnp.float32), state), state


@jax.jit
def recurrent_retention(q, k, v, log_decay, reset, initial_state=None):
  """Token by token with `retention_step` (a lax.scan over T)."""
  batch, _, heads, d_k = q.shape
  state0 = (jnp.zeros((batch, heads, d_k, v.shape[-1]), jnp.float32) if initial_state is None
            else initial_state.astype(jnp.float32))

  def step(state, inputs):
    o, state = retention_step(state, *inputs)
    return state, o

  final_state, o = jax.lax.scan(step, state0, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_decay, reset)))
  return jnp.moveaxis(o, 0, 1), final_state
