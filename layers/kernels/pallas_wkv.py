"""The RWKV-6 wkv (layers/mixers/wkv.py) as Pallas Triton kernels for NVIDIA GPUs, forward and backward.

The same function as `chunked_wkv`, in chunks of C tokens and sub-chunks of SUB.
Every exponent taken is a decay between two points of a chunk, forwards in time
(<= 0). XLA materialises the [SUB, SUB, K] decays of the pairs inside each
sub-chunk. Here a program owns one (sub-chunk, row, head) and walks its tokens
one at a time with those decays in registers, as flash-linear-attention's
chunk_rwkv6 does. With G the cumulative log decay inside a chunk (inclusive),
E_j the state entering chunk j and A the scores of the pairs s < t inside a
sub-chunk (A_ts = sum_k r_t k_s prod_{s<p<t} w_p, in one document), the kernels are:

  decays            per chunk: G (one cumulative sum, read by all the others)
  states            per (row, head, STATE_BLOCK value channels), over the chunks in order:
                    E_{j+1} = diag(survival_j) E_j + K_j'^T V_j
  forward           per sub-chunk: y = (r e^{G_{t-1}}) E_j + pairs with each earlier sub-chunk (matmuls through
                    the sub-chunk's first token) + A v (A walked, one key a step) + the bonus (r . u k) v
  state_cotangents  per (row, head, value channels), over the chunks in reverse:
                    dE_j = diag(survival_j) dE_{j+1} + Q_j^T dy_j
  score_cotangents  per sub-chunk: dA_ts = dy_t . v_s, by query and by key (two layouts, so that the walks
                    load a row a step)
  query_gradients   per sub-chunk: dL/dr (the entering state, each earlier sub-chunk, the walk by key over dA)
  key_gradients     per sub-chunk: dL/dk (the leaving state, each later sub-chunk, the walk by query over dA),
                    dL/dv (the same and A^T dy), dL/du

The walks only multiply and add: the reductions over channels are matmuls
(A v, A^T dy, dA) or are done once in the forward (A). Pairs across
sub-chunks are one program's matmuls with each sub-chunk before (or after)
its own, under a lax.cond each, so that no work is spent on pairs that do
not exist. The forward keeps E_j and A for the backward, which recomputes
only G (at B=8, T=8192, N=16, K=V=64: 268 MB of states and 67 MB of scores).

The log decays' gradient comes from the others. Each term of y or of the last
state is a pair (t, s) weighted by exp(G_{t-1} - G_s), whose derivative in
log w_p is that weight times [s < p <= t - 1]. So

    dL/d log w_p = sum_{t > p} r_t * dr'_t - sum_{s >= p} k_s * dk'_s + sum_v (dL/dS_T * S_T)[:, v]

with dr', dk' the gradients without the bonus's term. The two gradient
kernels write the sums inside each sub-chunk and each sub-chunk's totals; XLA
adds the totals of the sub-chunks after it.

Rounding. A difference G_a - G_b of two large cumulative sums loses absolute
precision (about |G| 6e-8), which matters where the true difference is near
0 and the pair's weight near 1. Inside a sub-chunk the walks therefore carry
products of one token's decay a step (no differences at all). Across
sub-chunks G_{t-1} is read from the same array as G, one row earlier, so that
neighbouring tokens' difference is exactly 0. On the tests' inputs, which mix
decays near 0 and near 1 per element (|y| up to 51), the kernels' y is within
3.5e-4 of the recurrent form with chunks of 32 and `chunked_wkv`'s within
9.1e-4; with chunks of 64 both are within 1.9e-3 (CPU, float32).

Inputs r, k, log_w [B, T, N, K], v [B, T, N, V], u [N, K], reset [B, T], initial
state [B, N, K, V]; K, V and C powers of two >= 16 (Triton's matmul tiles).
Under a mesh each device runs the kernels on its own rows and heads
(jax.shard_map). Off GPU they run in Pallas interpret mode (the tests compare
them with the recurrent form on CPU).

Their times against flash-linear-attention's chunk_rwkv6 (`benchmark --mode=op
--op=wkv --peer`) and the variants measured on the way are in docs/performance.md
("wkv as Pallas Triton kernels").
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from layers import sharding
from layers.kernels import kernel_sharding

SUB = 16           # tokens per sub-chunk: pairs across sub-chunks are matmuls, inside one they are walked
NUM_WARPS = 4      # every kernel; 8 were slower, the key kernel most (docs/performance.md, the wkv variants)
STATE_BLOCK = 32   # value channels per program of the two kernels that walk the chunks in order


def supports(d_k: int, d_v: int, chunk_size: int) -> bool:
  """Whether the kernels take these sizes: powers of two >= SUB (Triton's tiles and matmuls)."""
  return all(n >= SUB and n & (n - 1) == 0 for n in (d_k, d_v, chunk_size))


def _matmul(a, b):     # a @ b, float32 accumulation
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _matmul_t(a, b):   # a @ b^T
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _t_matmul(a, b):   # a^T @ b
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _exp_where(mask: jax.Array, exponent: jax.Array) -> jax.Array:
  """exp(exponent) where mask, else 0 (the masked exponents may be positive and overflow)."""
  return jnp.exp(jnp.where(mask, exponent, -jnp.inf))


class _Rows(NamedTuple):
  """A sub-chunk of SUB tokens of one (row, head): float32 tiles [SUB, X] and the decays inside the chunk."""
  first: jax.Array        # its first token, counted from the chunk's start
  r: jax.Array
  k: jax.Array
  v: jax.Array
  g: jax.Array            # G_t, the log decay from the chunk's start through t (inclusive)
  g_before: jax.Array     # G_{t-1}
  offset: jax.Array       # [K] G at the token before the sub-chunk
  g_end: jax.Array        # [K] G at its last token
  segment: jax.Array      # [SUB] document index inside the chunk (0: the one the entering state belongs to)

  @property
  def state_decay(self) -> jax.Array:
    """e^{G_{t-1}} where t still sees the entering state (no document start before it in the chunk), else 0."""
    return jnp.where((self.segment == 0)[:, None], jnp.exp(self.g_before), 0.0)


class _Chunk:
  """One chunk of one (row, head): loads of its inputs, of G (written by `_decays_kernel`) and of the document
  segments. G_{t-1} is loaded from the same array as G_t (one row earlier), so that the difference of the two
  at neighbouring tokens is exactly 0."""

  def __init__(self, row, head, index, chunk_size: int, decays: tuple):
    self.row, self.head, self.size = row, head, chunk_size
    self.start = index * chunk_size
    self.log_w_ref, self.g_ref, self.segment_ref = decays                   # g_ref [B, 1 + T, N, K]: G_t at 1 + t
    self.g_last = self.g_token(chunk_size - 1)                              # [K]
    self.segment_last = self.segment_ref[row, self.start + chunk_size - 1]

  def tile(self, ref, first=0, size: int | None = None, channels=slice(None)) -> jax.Array:
    """ref[row, start + first : + size, head, channels] as float32 [size, X]."""
    tile = ref[self.row, pl.ds(self.start + first, self.size if size is None else size), self.head, channels]
    return tile.astype(jnp.float32)

  def token(self, ref, index) -> jax.Array:
    """ref[row, start + index, head, :] as float32 [X]."""
    return ref[self.row, self.start + index, self.head, :].astype(jnp.float32)

  def g_tile(self, first=0, size: int | None = None, before: bool = False) -> jax.Array:
    """[size, K]: G_t for the chunk's tokens t = first ... first + size - 1, or G_{t-1} if `before` (0 at the
    chunk's first token)."""
    size = self.size if size is None else size
    tile = self.g_ref[self.row, pl.ds(self.start + first + (not before), size), self.head, :]
    if before:
      tile = jnp.where((first + jnp.arange(size) == 0)[:, None], 0.0, tile)
    return tile

  def g_token(self, index, before: bool = False) -> jax.Array:
    """[K]: G at the chunk's token `index` (or G_{index-1} if `before`)."""
    value = self.g_ref[self.row, self.start + index + (not before), self.head, :]
    return jnp.where(index == 0, 0.0, value) if before else value

  def segments(self, first=0, size: int | None = None) -> jax.Array:
    return self.segment_ref[self.row, pl.ds(self.start + first, self.size if size is None else size)]

  def survival(self) -> jax.Array:
    """[K]: the factor by which the entering state survives the chunk (0 past a document start)."""
    return jnp.where(self.segment_last == 0, jnp.exp(self.g_last), 0.0)

  def to_end(self, g: jax.Array, segment: jax.Array) -> jax.Array:
    """[S, K]: e^{G_last - G_s} for keys s of the chunk's last document, else 0."""
    return _exp_where((segment == self.segment_last)[:, None], self.g_last[None, :] - g)

  def state_queries(self, r: jax.Array) -> jax.Array:
    """[C, K]: r_t e^{G_{t-1}} where t still sees the entering state, else 0."""
    return r * jnp.where((self.segments() == 0)[:, None], jnp.exp(self.g_tile(before=True)), 0.0)

  def sub(self, i, r_ref, k_ref, v_ref) -> _Rows:
    """Sub-chunk i (tokens i SUB ... (i + 1) SUB - 1 of the chunk)."""
    first = i * SUB
    tile = lambda ref: self.tile(ref, first, SUB)
    return _Rows(first, tile(r_ref), tile(k_ref), tile(v_ref), self.g_tile(first, SUB),
                 self.g_tile(first, SUB, before=True), self.g_token(first, before=True),
                 self.g_token(first + SUB - 1), self.segments(first, SUB))

  def walk(self, rows: _Rows, refs: tuple, step, carry, by_key: bool):
    """carry = step(n, decays, segment_n, *(ref rows at n), carry) over the sub-chunk's tokens n: its keys from
    last to first (`by_key`), with decays [SUB, K] = prod_{n < p < t} w_p for the queries t > n; or its queries
    from first to last, with decays = prod_{s < p < n} w_p for the keys s < n (0 elsewhere). The products grow
    by one token's decay a step, so that none is a difference of cumulative sums. Unrolled, with every load
    issued before the first step."""
    inside = jnp.arange(SUB)[:, None]
    w = [jnp.exp(self.token(self.log_w_ref, rows.first + n)) for n in range(SUB)]
    segments = [self.segment_ref[self.row, self.start + rows.first + n] for n in range(SUB)]
    loaded = [[self.token(ref, rows.first + n) for ref in refs] for n in range(SUB)]
    products = jnp.ones_like(rows.g)
    for n in (reversed(range(SUB)) if by_key else range(SUB)):
      if by_key and n + 1 < SUB:    # from key n + 1 to key n
        products = jnp.where(inside == n + 1, 1.0, products * w[n + 1][None, :])
      if not by_key and n > 0:      # from query n - 1 to query n
        products = jnp.where(inside == n - 1, 1.0, products * w[n - 1][None, :])
      decays = jnp.where(inside > n if by_key else inside < n, products, 0.0)
      carry = step(n, decays, segments[n], *loaded[n], carry)
    return carry

  def same_document(self, rows: _Rows, first: int) -> jax.Array:
    """[SUB, SUB]: whether token t of `rows` and token s of the sub-chunk at `first` are in one document."""
    return rows.segment[:, None] == self.segments(first, SUB)[None, :]

  def keys_through(self, k_ref, first: int, rows: _Rows) -> jax.Array:
    """[SUB, K]: k_s e^{G_{p-1} - G_s} for the keys s of the earlier sub-chunk at `first` (p: rows' first token)."""
    return self.tile(k_ref, first, SUB) * jnp.exp(rows.offset[None, :] - self.g_tile(first, SUB))

  def queries_through(self, r_ref, first: int, rows: _Rows) -> jax.Array:
    """[SUB, K]: r_t e^{G_{t-1} - G_e} for the queries t of the later sub-chunk at `first` (e: rows' last token)."""
    return self.tile(r_ref, first, SUB) * jnp.exp(self.g_tile(first, SUB, before=True) - rows.g_end[None, :])

  def over_sub_chunks(self, i, add, carry, earlier: bool):
    """carry = add(first, carry) over the chunk's other sub-chunks (at token `first`) before sub-chunk i
    (`earlier`) or after it: unrolled, each under a lax.cond on i, so that a program's matmuls cover only the
    pairs that exist."""
    per_chunk = self.size // SUB
    for m in range(per_chunk - 1) if earlier else range(1, per_chunk):
      carry = jax.lax.cond(m < i if earlier else m > i, functools.partial(add, m * SUB), lambda x: x, carry)
    return carry


# ---------------------------------------------------------------------------- kernels

def _decays_kernel(log_w_ref, g_ref, *, chunk_size):
  """G_t inside each chunk, at row 1 + t of [B, 1 + T, N, K] (row 0 is never read); a program per (chunk,
  row, head)."""
  j, row, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  log_w = log_w_ref[row, pl.ds(j * chunk_size, chunk_size), head, :].astype(jnp.float32)
  g_ref[row, pl.ds(1 + j * chunk_size, chunk_size), head, :] = jnp.cumsum(log_w, axis=0)


def _state_channels(d_v: int) -> pl.Slice:
  """The value channels of this program of the kernels walking the chunks in order (grid axis 2)."""
  block = min(STATE_BLOCK, d_v)
  return pl.ds(pl.program_id(2) * block, block)


def _states_kernel(k_ref, v_ref, *refs, chunk_size):
  """E_j for every chunk j [B, n, N, K, V] and the last state [B, N, K, V]; a program per (row, head, block
  of STATE_BLOCK value channels)."""
  decays, (h0_ref, states_ref, final_ref) = refs[:3], refs[3:]
  row, head = pl.program_id(0), pl.program_id(1)
  channels = _state_channels(states_ref.shape[-1])

  def chunk(j, state):
    c = _Chunk(row, head, j, chunk_size, decays)
    states_ref[row, j, head, :, channels] = state
    keys = c.tile(k_ref) * c.to_end(c.g_tile(), c.segments())               # [C, K]
    return c.survival()[:, None] * state + _t_matmul(keys, c.tile(v_ref, channels=channels))

  h0 = h0_ref[row, head, :, channels].astype(jnp.float32)
  final_ref[row, head, :, channels] = jax.lax.fori_loop(0, states_ref.shape[1], chunk, h0)


def _state_cotangents_kernel(r_ref, d_y_ref, *refs, chunk_size):
  """dL/dE_{j+1}, the cotangent of the state leaving chunk j [B, n, N, K, V], and dL/dh0 [B, N, K, V]."""
  decays, (d_final_ref, d_states_ref, d_h0_ref) = refs[:3], refs[3:]
  row, head = pl.program_id(0), pl.program_id(1)
  channels = _state_channels(d_states_ref.shape[-1])
  num_chunks = d_states_ref.shape[1]

  def chunk(i, d_state):
    j = num_chunks - 1 - i
    c = _Chunk(row, head, j, chunk_size, decays)
    d_states_ref[row, j, head, :, channels] = d_state
    queries = c.state_queries(c.tile(r_ref))                                # [C, K]
    return c.survival()[:, None] * d_state + _t_matmul(queries, c.tile(d_y_ref, channels=channels))

  d_final = d_final_ref[row, head, :, channels].astype(jnp.float32)
  d_h0_ref[row, head, :, channels] = jax.lax.fori_loop(0, num_chunks, chunk, d_final)


def _sub_chunk_program(chunk_size: int, decays: tuple):
  """(chunk, its index, sub-chunk index, row, head) of a program of the grid (sub-chunks, rows, heads)."""
  index, row, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  per_chunk = chunk_size // SUB
  j = index // per_chunk
  return _Chunk(row, head, j, chunk_size, decays), j, index % per_chunk, row, head


def _forward_kernel(r_ref, k_ref, v_ref, u_ref, *refs, chunk_size):
  """y [B, T, N, V] float32 and the scores of the pairs inside each sub-chunk [B, T, N, SUB] (row t: over the
  keys s, 0 unless s < t in one document); a program per (sub-chunk, row, head)."""
  decays, (states_ref, y_ref, scores_ref) = refs[:3], refs[3:]
  c, j, i, row, head = _sub_chunk_program(chunk_size, decays)
  rows = c.sub(i, r_ref, k_ref, v_ref)
  y = _matmul(rows.r * rows.state_decay, states_ref[row, j, head])          # [SUB, V]
  queries = rows.r * jnp.exp(rows.g_before - rows.offset[None, :])          # [SUB, K]: through the first token

  def earlier(first, y):  # keys in an earlier sub-chunk
    scores = jnp.where(c.same_document(rows, first), _matmul_t(queries, c.keys_through(k_ref, first, rows)), 0.0)
    return y + _matmul(scores, c.tile(v_ref, first, SUB))

  y = c.over_sub_chunks(i, earlier, y, earlier=True)

  columns = jnp.arange(SUB)[None, :]

  def key(s, decays, segment_s, k_s, scores):  # column s: the pairs (t > s) with key s inside the sub-chunk
    score = jnp.where(rows.segment == segment_s, jnp.sum(rows.r * k_s[None, :] * decays, axis=1), 0.0)  # [SUB]
    return jnp.where(columns == s, score[:, None], scores)

  scores = c.walk(rows, (k_ref,), key, jnp.zeros((SUB, SUB), jnp.float32), by_key=True)   # [SUB, SUB]
  u = u_ref[head].astype(jnp.float32)[None, :]
  y += _matmul(scores, rows.v) + jnp.sum(rows.r * u * rows.k, axis=1, keepdims=True) * rows.v  # + the bonus
  tokens = pl.ds(c.start + rows.first, SUB)
  y_ref[row, tokens, head, :] = y
  scores_ref[row, tokens, head, :] = scores


def _score_cotangents_kernel(d_y_ref, v_ref, segment_ref, by_query_ref, by_key_ref):
  """dL/d score of the pairs s < t of one document inside each sub-chunk, dy_t . v_s, as [B, T, N, SUB] by
  query (row t: over the keys s) and by key (row s: over the queries t); a program per (sub-chunk, row, head)."""
  index, row, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tokens = pl.ds(index * SUB, SUB)
  d_y, v = d_y_ref[row, tokens, head, :].astype(jnp.float32), v_ref[row, tokens, head, :].astype(jnp.float32)
  segment, inside = segment_ref[row, tokens], jnp.arange(SUB)
  same = segment[:, None] == segment[None, :]
  by_query_ref[row, tokens, head, :] = jnp.where(same & (inside[:, None] > inside[None, :]), _matmul_t(d_y, v), 0.0)
  by_key_ref[row, tokens, head, :] = jnp.where(same & (inside[:, None] < inside[None, :]), _matmul_t(v, d_y), 0.0)


def _query_gradients_kernel(r_ref, k_ref, v_ref, u_ref, *refs, chunk_size):
  """dL/dr [B, T, N, K]; of dL/d log w_p inside the sub-chunk, the queries' part sum_{t > p} r_t dr'_t [B, T, N, K]
  and its total [B, T / SUB, N, K]. A program per (sub-chunk, row, head); dr' is dL/dr without the bonus."""
  decays, (states_ref, d_y_ref, d_scores_ref, d_r_ref, d_log_w_ref, total_ref) = refs[:3], refs[3:]
  c, j, i, row, head = _sub_chunk_program(chunk_size, decays)
  rows = c.sub(i, r_ref, k_ref, v_ref)
  d_y = c.tile(d_y_ref, rows.first, SUB)                                     # [SUB, V]
  d_r = _matmul_t(d_y, states_ref[row, j, head]) * rows.state_decay         # [SUB, K]: the entering state

  def earlier(first, d_queries):  # keys in an earlier sub-chunk: the cotangent of queries through the first token
    d_scores = jnp.where(c.same_document(rows, first), _matmul_t(d_y, c.tile(v_ref, first, SUB)), 0.0)  # [SUB, SUB]
    return d_queries + _matmul(d_scores, c.keys_through(k_ref, first, rows))

  d_queries = c.over_sub_chunks(i, earlier, jnp.zeros_like(d_r), earlier=True)
  d_r += d_queries * jnp.exp(rows.g_before - rows.offset[None, :])

  def key(s, decays, segment_s, k_s, d_scores_s, d_r):  # pairs (t > s) inside the sub-chunk, by key
    return d_r + d_scores_s[:, None] * k_s[None, :] * decays

  d_r = c.walk(rows, (k_ref, d_scores_ref), key, d_r, by_key=True)
  q_terms = rows.r * d_r                                                     # [SUB, K]
  q_sum = jnp.sum(q_terms, axis=0)
  u = u_ref[head].astype(jnp.float32)[None, :]
  d_r += jnp.sum(d_y * rows.v, axis=1, keepdims=True) * u * rows.k          # the bonus (r_t . u k_t) v_t
  tokens = pl.ds(c.start + rows.first, SUB)
  d_r_ref[row, tokens, head, :] = d_r.astype(d_r_ref.dtype)
  d_log_w_ref[row, tokens, head, :] = q_sum - jnp.cumsum(q_terms, axis=0)
  total_ref[row, pl.program_id(0), head] = q_sum


def _key_gradients_kernel(r_ref, k_ref, v_ref, u_ref, *refs, chunk_size):
  """dL/dk, dL/dv [B, T, N, X]; dL/d log w_p inside the sub-chunk [B, T, N, K] (the queries' part, read, minus
  sum_{s >= p} k_s dk'_s) and the keys' total [B, T / SUB, N, K]; dL/du per sub-chunk [B, T / SUB, N, K]."""
  decays, (d_states_ref, d_y_ref, scores_ref, d_scores_ref, queries_part_ref, d_k_ref, d_v_ref, d_log_w_ref,
           total_ref, d_u_ref) = refs[:3], refs[3:]
  c, j, i, row, head = _sub_chunk_program(chunk_size, decays)
  rows = c.sub(i, r_ref, k_ref, v_ref)
  d_y = c.tile(d_y_ref, rows.first, SUB)                                     # [SUB, V]
  d_state = d_states_ref[row, j, head]                                       # [K, V]: of the leaving state
  to_end = c.to_end(rows.g, rows.segment)                                    # [SUB, K]
  d_k = _matmul_t(rows.v, d_state) * to_end
  d_v = _matmul(rows.k * to_end, d_state)                                    # [SUB, V]
  through_end = jnp.exp(rows.g_end[None, :] - rows.g)                       # [SUB, K]
  keys = rows.k * through_end                                                # through the last token

  def later(first, grads):  # queries in a later sub-chunk: the cotangents of keys (through the last token) and v
    d_keys, d_v = grads
    queries, d_y_later = c.queries_through(r_ref, first, rows), c.tile(d_y_ref, first, SUB)
    same = c.same_document(rows, first)
    return (d_keys + _matmul(jnp.where(same, _matmul_t(rows.v, d_y_later), 0.0), queries),
            d_v + _matmul(jnp.where(same, _matmul_t(keys, queries), 0.0), d_y_later))

  d_keys, d_v = c.over_sub_chunks(i, later, (jnp.zeros_like(d_k), d_v), earlier=False)
  d_k += d_keys * through_end

  def query(t, decays, segment_t, r_t, d_scores_t, d_k):  # pairs (t > s) inside the sub-chunk, by query
    return d_k + d_scores_t[:, None] * r_t[None, :] * decays

  d_k = c.walk(rows, (r_ref, d_scores_ref), query, d_k, by_key=False)
  tokens = pl.ds(c.start + rows.first, SUB)
  d_v += _t_matmul(scores_ref[row, tokens, head, :], d_y)                   # [SUB, V]: scores^T dy
  k_terms = rows.k * d_k                                                     # [SUB, K]
  k_sum = jnp.sum(k_terms, axis=0)
  d_log_w_ref[row, tokens, head, :] = (queries_part_ref[row, tokens, head, :]
                                       - (k_sum - jnp.cumsum(k_terms, axis=0) + k_terms))
  # The bonus (r_t . u k_t) v_t.
  u = u_ref[head].astype(jnp.float32)[None, :]
  d_bonus = jnp.sum(d_y * rows.v, axis=1, keepdims=True)                     # [SUB, 1]
  d_k += d_bonus * u * rows.r
  d_v += jnp.sum(rows.r * u * rows.k, axis=1, keepdims=True) * d_y
  d_k_ref[row, tokens, head, :] = d_k.astype(d_k_ref.dtype)
  d_v_ref[row, tokens, head, :] = d_v.astype(d_v_ref.dtype)
  total_ref[row, pl.program_id(0), head] = k_sum
  d_u_ref[row, pl.program_id(0), head] = jnp.sum(d_bonus * rows.r * rows.k, axis=0)


# ---------------------------------------------------------------------------- calls

def _call(kernel, args: tuple, out_shapes, grid: tuple, name: str, **params):
  """kernel(*args) over `grid` with NUM_WARPS warps a program; `params` are bound to the kernel."""
  return kernel_sharding.triton_call(functools.partial(kernel, **params), out_shapes, grid, NUM_WARPS, name)(*args)


def _state_grid(batch: int, heads: int, d_v: int) -> tuple[int, int, int]:
  return batch, heads, d_v // min(STATE_BLOCK, d_v)  # powers of two


def _decays(log_w, reset, chunk_size):
  """(log_w, G inside each chunk [B, 1 + T, N, K] float32 (G_t at 1 + t), document segments inside each chunk
  [B, T] int32): the `decays` refs of the kernels."""
  batch, length, heads, d_k = log_w.shape
  g = _call(_decays_kernel, (log_w,), jax.ShapeDtypeStruct((batch, 1 + length, heads, d_k), jnp.float32),
            (length // chunk_size, batch, heads), 'wkv_decays', chunk_size=chunk_size)
  segment = jnp.cumsum(reset.reshape(batch, -1, chunk_size), axis=-1).reshape(batch, length)
  return log_w, g, segment


def _states(k, v, decays, h0, chunk_size):
  batch, length, heads, d_k = k.shape
  states = jax.ShapeDtypeStruct((batch, length // chunk_size, heads, d_k, v.shape[-1]), jnp.float32)
  return _call(_states_kernel, (k, v, *decays, h0), (states, jax.ShapeDtypeStruct(h0.shape, jnp.float32)),
               _state_grid(batch, heads, v.shape[-1]), 'wkv_states', chunk_size=chunk_size)


def _local_forward(r, k, v, log_w, u, reset, h0, chunk_size):
  batch, length, heads, _ = r.shape
  decays = _decays(log_w, reset, chunk_size)
  states, final = _states(k, v, decays, h0, chunk_size)
  y, scores = _call(_forward_kernel, (r, k, v, u, *decays, states),
                    (jax.ShapeDtypeStruct(v.shape, jnp.float32),
                     jax.ShapeDtypeStruct((batch, length, heads, SUB), jnp.float32)),
                    (length // SUB, batch, heads), 'wkv_forward', chunk_size=chunk_size)
  return y, final, scores, states


def _local_backward(r, k, v, log_w, u, reset, states, scores, d_y, d_final, chunk_size):
  batch, length, heads, key_size = r.shape
  decays = _decays(log_w, reset, chunk_size)
  d_states, d_h0 = _call(_state_cotangents_kernel, (r, d_y, *decays, d_final),
                         (jax.ShapeDtypeStruct(states.shape, jnp.float32),
                          jax.ShapeDtypeStruct(d_final.shape, jnp.float32)),
                         _state_grid(batch, heads, v.shape[-1]), 'wkv_state_cotangents', chunk_size=chunk_size)
  num_subs = length // SUB
  grid = (num_subs, batch, heads)
  pair_scores = jax.ShapeDtypeStruct(scores.shape, jnp.float32)
  d_scores_by_query, d_scores_by_key = _call(_score_cotangents_kernel, (d_y, v, decays[2]),
                                             (pair_scores, pair_scores), grid, 'wkv_score_cotangents')
  per_sub = jax.ShapeDtypeStruct((batch, num_subs, heads, key_size), jnp.float32)
  series = jax.ShapeDtypeStruct(log_w.shape, jnp.float32)
  d_r, queries_part, queries_total = _call(_query_gradients_kernel, (r, k, v, u, *decays, states, d_y, d_scores_by_key),
                                           (jax.ShapeDtypeStruct(r.shape, r.dtype), series, per_sub), grid,
                                           'wkv_query_gradients', chunk_size=chunk_size)
  d_k, d_v, d_log_w, keys_total, d_u = _call(
      _key_gradients_kernel, (r, k, v, u, *decays, d_states, d_y, scores, d_scores_by_query, queries_part),
      (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype), series, per_sub, per_sub),
      grid, 'wkv_key_gradients', chunk_size=chunk_size)
  d_log_w_total = queries_total - keys_total
  later = jnp.cumsum(d_log_w_total[:, ::-1], axis=1)[:, ::-1] - d_log_w_total  # sub-chunks after each
  d_log_w = d_log_w.reshape(batch, num_subs, SUB, heads, key_size) + later[:, :, None]
  return d_r, d_k, d_v, d_log_w.reshape(log_w.shape), jnp.sum(d_u, axis=1), d_h0


class _Specs(NamedTuple):
  """PartitionSpecs under the active mesh: rows split along act_batch, heads along act_heads."""
  series: jax.sharding.PartitionSpec          # [B, T, N, X]
  per_head: jax.sharding.PartitionSpec        # [N, K]
  tokens: jax.sharding.PartitionSpec          # [B, T]
  state: jax.sharding.PartitionSpec           # [B, N, K, V]
  per_row_head: jax.sharding.PartitionSpec    # [B, N, K]
  chunk_states: jax.sharding.PartitionSpec    # [B, T / C, N, K, V]


def _specs(batch: int, heads: int) -> _Specs:
  rows = kernel_sharding.mesh_axes(sharding.ACT_BATCH, batch)
  split = kernel_sharding.mesh_axes(sharding.ACT_HEADS, heads)
  spec = kernel_sharding.spec
  return _Specs(spec((rows, (), split, ())), spec((split, ())), spec((rows, ())), spec((rows, split, (), ())),
                spec((rows, split, ())), spec((rows, (), split, (), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _wkv(r, k, v, log_w, u, reset, h0, chunk_size):
  return _wkv_forward(r, k, v, log_w, u, reset, h0, chunk_size)[0]


def _wkv_forward(r, k, v, log_w, u, reset, h0, chunk_size):
  """(y, the last state), and the residuals: the inputs, the states entering the chunks and the scores of the
  pairs inside the sub-chunks (kept for the backward, which recomputes only G)."""
  s = _specs(r.shape[0], r.shape[2])
  y, final, scores, states = kernel_sharding.run_sharded(
      functools.partial(_local_forward, chunk_size=chunk_size), (r, k, v, log_w, u, reset, h0),
      (s.series, s.series, s.series, s.series, s.per_head, s.tokens, s.state),
      (s.series, s.state, s.series, s.chunk_states))
  return (y, final), (r, k, v, log_w, u, reset, states, scores, final)


def _wkv_backward(chunk_size, residuals, cotangents):
  r, k, v, log_w, u, reset, states, scores, final = residuals
  d_y, d_final = cotangents
  s = _specs(r.shape[0], r.shape[2])
  d_r, d_k, d_v, d_log_w, d_u, d_h0 = kernel_sharding.run_sharded(
      functools.partial(_local_backward, chunk_size=chunk_size),
      (r, k, v, log_w, u, reset, states, scores, d_y, d_final),
      (s.series, s.series, s.series, s.series, s.per_head, s.tokens, s.chunk_states, s.series, s.series, s.state),
      (s.series, s.series, s.series, s.series, s.per_row_head, s.state))
  d_log_w += jnp.sum(d_final * final, axis=-1)[:, None]                      # the last state: every p <= T
  return d_r, d_k, d_v, d_log_w, jnp.sum(d_u, axis=0).astype(u.dtype), None, d_h0


_wkv.defvjp(_wkv_forward, _wkv_backward)


def fused_wkv(r, k, v, log_w, u, reset, initial_state=None, *, chunk_size: int = 64):
  """y [B, T, N, V] float32 and the last state [B, N, K, V] float32; T is padded to whole chunks with identity
  steps. u None: no bonus."""
  batch, length, heads, d_k = r.shape
  d_v = v.shape[-1]
  if not supports(d_k, d_v, chunk_size):
    raise ValueError(f'the fused wkv kernels need head sizes and a chunk size that are powers of two >= {SUB}; '
                     f'got d_k={d_k}, d_v={d_v}, chunk_size={chunk_size}')
  h0 = jnp.zeros((batch, heads, d_k, d_v), jnp.float32) if initial_state is None else initial_state
  u = jnp.zeros((heads, d_k), jnp.float32) if u is None else u
  extra = -length % chunk_size
  pad = lambda x: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))
  r, k, v, log_w, reset = map(pad, (r, k, v, log_w.astype(jnp.float32), reset.astype(jnp.int32)))
  y, final = _wkv(r, k, v, log_w, u, reset, h0.astype(jnp.float32), chunk_size)
  return y[:, :length], final
