"""The block-recurrent cell (Hutchins et al. 2022, arXiv 2203.07852; docs/architectures.md,
Block-Recurrent Transformer).

A block of S state vectors s [S, D] (float32) is updated once per window of W tokens. Per window,
with learned state IDs e [S, D] and u = RMSNorm(s) + e:
  state side:  q_s = u Wq, q2_s = u Wq2, k_s = u Wk, v_s = u Wv
  token side:  q, k, v of the window's tokens (layers/mixers/windowed_attention.py) and q2 = x W_q2
Four attentions; keys and values are computed once per side and read by both directions, each
direction has its own queries (the state's K/V projections are its own, as in meliad, or the token
side's with `token_kv`: one set of K/V weights for tokens and states):
  tokens -> tokens  q  over (k, v)      causal, windowed (the token side's self-attention)
  tokens -> state   q2 over (k_s, v_s)  unmasked                   } read by the token side
  state  -> state   q_s over (k_s, v_s) unmasked                   } make the next state
  state  -> tokens  q2_s over (k, v)    the window's tokens, unmasked inside the document
The tokens read the state as it was at the start of their window; the next state is
  variant 'skip'   (no FFN on the state side; the paper's Rec:fixed:skip):
                   s' = gate(s, W_o[a_self | a_cross])
  variant 'dual':  h = gate1(s, W_o[a_self | a_cross]);  s' = gate2(h, FFN(RMSNorm(h)))
  variant 'single': s' = gate(s, tanh(FFN([a_self | a_cross])))      (no projection, one gate)
with gates (meliad's nn_components.MLP gates; x the gate's input: the attention outputs for the
projection gate, the FFN's hidden units for the FFN gate):
  'fixed' (meliad 'bias'):  g = sigmoid(b) per channel;  s' = s * g + y * (1 - g)
  'lstm':   f = sigmoid(W_f x + b_f + 1), i = sigmoid(W_i x + b_i - 1);  s' = s * f + y * i
The gate arithmetic runs in float32 whatever the compute dtype. With RoPE on the token side the
state reads the rotated token keys (the cache holds them rotated); position='t5' (meliad's) rotates
nothing.

Documents: the state carries the id of the document it summarises. A token whose document is not
the state's (a document that started since, at a position-0 token anywhere in a window) reads the
learned initial state instead. At the end of a window the state moves to the latest document seen
(restarting from the initial state if that is a new one) and reads only that document's tokens;
a window with no such token (all padding) leaves the state as it is. The update is applied only
for a window the call has seen to its last token: a decode step that completes a window updates
the state, so token-by-token generation follows the windowed forward pass exactly.

Two drivers, one cell: `blocked` scans the windows of a laid-out segment (jax.lax.scan, so compile
time does not grow with the segment length); `flat` handles T < W new tokens (decoding), where at
most one window ends.

`BlockRecurrentAttention` is the recurrent layer's mixer (layers/blocks/residual.py): the windowed
self-attention a_self of layers/mixers/windowed_attention.py and the tokens' read of the state a_state,
projected together, y = [a_self | a_state] W_o (the paper's token side, before the residual and FFN).
Its decode cache is the ring of token keys and the state (RecurrentLayerCache).
"""
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from layers import sharding
from layers.blocks.kv_cache import KVCache
from layers.blocks.linear import Dense
from layers.blocks.mlp import ACTIVATIONS
from layers.blocks.norms import RMSNorm
from layers.documents import Segments
from layers.flops import Lengths, attention_flops
from layers.mixers.windowed_attention import Blocked, Layout, WindowedAttention, WindowKeys, attend, l2_normalise
from layers.param_roles import BIAS, NORM, STATE, param

GATES = ('fixed', 'lstm')
VARIANTS = ('skip', 'single', 'dual')


@flax.struct.dataclass
class RecurrentState:
  state: jax.Array     # [B, S, D] float32
  document: jax.Array  # [B] int32: the document the state summarises (-1: none yet)
  keys: jax.Array      # [B, S, K, H]: the state's keys and values, so that a decode step reads them
  values: jax.Array    # without projecting the state again (refreshed whenever the state changes)

  @classmethod
  def create(cls, batch: int, num_states: int, dim: int, num_kv_heads: int, head_dim: int,
             dtype: jnp.dtype) -> 'RecurrentState':
    kv = jnp.zeros((batch, num_states, num_kv_heads, head_dim), dtype)
    return cls(state=jnp.zeros((batch, num_states, dim), jnp.float32),
               document=jnp.full((batch,), -1, jnp.int32), keys=kv, values=kv)


@flax.struct.dataclass
class StateProjection:
  q: jax.Array   # [B or 1, S, N, H] state self-attention queries
  q2: jax.Array  # [B or 1, S, N, H] queries reading the tokens
  k: jax.Array   # [B or 1, S, K, H]
  v: jax.Array


class Gate(nnx.Module):
  """Combines the old value s with the proposal y (see the module docstring); float32."""

  def __init__(self, kind: str, in_features, dim: int, in_names, *, dtype, param_dtype, rngs: nnx.Rngs):
    if kind not in GATES:
      raise ValueError(f'unknown gate {kind!r}; known: {GATES}')
    self.kind = kind
    if kind == 'fixed':
      init = sharding.partitioned(nnx.initializers.normal(0.1), (sharding.NORM,))
      self.bias = param(init(rngs.params(), (dim,), param_dtype), BIAS)
    else:  # meliad: kernels at 0.1 x the usual fan-in variance; biases start at 0 here
      common = dict(names=(*in_names, sharding.EMBED), use_bias=True, init_scale=0.1,
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      self.forget = Dense(in_features, dim, **common)
      self.input = Dense(in_features, dim, **common)

  def __call__(self, s: jax.Array, y: jax.Array, x: jax.Array) -> jax.Array:
    s, y = s.astype(jnp.float32), y.astype(jnp.float32)
    if self.kind == 'fixed':
      g = jax.nn.sigmoid(self.bias[...].astype(jnp.float32))
      return s * g + y * (1.0 - g)
    f = jax.nn.sigmoid(self.forget(x).astype(jnp.float32) + 1.0)
    i = jax.nn.sigmoid(self.input(x).astype(jnp.float32) - 1.0)
    return s * f + y * i


class StateFFN(nnx.Module):
  """Gated FFN down(act(x W_gate) * (x W_up)) that also returns its hidden units (a gate's input)."""

  def __init__(self, in_features, in_names, hidden: int, dim: int, *, activation: str, dtype, param_dtype,
               rngs: nnx.Rngs):
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.activation = activation
    self.gate = Dense(in_features, hidden, names=(*in_names, sharding.MLP), **common)
    self.up = Dense(in_features, hidden, names=(*in_names, sharding.MLP), **common)
    self.down = Dense(hidden, dim, names=(sharding.MLP, sharding.EMBED), **common)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    hidden = ACTIVATIONS[self.activation](self.gate(x)) * self.up(x)
    return self.down(hidden), hidden


class BlockRecurrentCell(nnx.Module):
  """State-side parameters and the per-window recurrence; the token side lives in WindowedAttention."""

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *, window: int,
               num_states: int, gate: str = 'fixed', variant: str = 'skip', mlp_dim: int = 0,
               mlp_activation: str = 'silu', qk_norm: bool = False, read_previous_window: bool = False,
               token_kv: tuple[Dense, Dense] | None = None, norm_eps: float = 1e-6,
               dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    """`token_kv`: the token side's key and value projections, to use for the state too (one set
    of K/V weights for tokens and states); by default the state has its own (meliad)."""
    if variant not in VARIANTS:
      raise ValueError(f'unknown variant {variant!r}; known: {VARIANTS}')
    self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
    self.window, self.num_states, self.mlp_dim = window, num_states, mlp_dim
    self.gate, self.variant, self.qk_norm, self.read_previous_window = gate, variant, qk_norm, read_previous_window
    self.dtype = dtype
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    state_names = (None, sharding.EMBED)
    self.state_ids = param(sharding.partitioned(nnx.initializers.normal(1.0), state_names)(
        rngs.params(), (num_states, dim), param_dtype), STATE)
    # Initial state at a document start: small, as meliad.
    self.initial_state = param(sharding.partitioned(nnx.initializers.normal(0.1), state_names)(
        rngs.params(), (num_states, dim), jnp.float32), STATE)
    self.norm = RMSNorm(dim, eps=norm_eps, param_dtype=param_dtype)
    q_names = (sharding.EMBED, sharding.HEADS, sharding.HEAD_DIM)
    kv_names = (sharding.EMBED, sharding.KV_HEADS, sharding.HEAD_DIM)
    self.query = Dense(dim, (num_heads, head_dim), names=q_names, **common)
    self.query2 = Dense(dim, (num_heads, head_dim), names=q_names, **common)
    if token_kv is None:
      self.key = Dense(dim, (num_kv_heads, head_dim), names=kv_names, **common)
      self.value = Dense(dim, (num_kv_heads, head_dim), names=kv_names, **common)
    else:  # the same modules as the token side's: nnx keeps one copy of the shared parameters
      self.key, self.value = token_kv
    ones = sharding.partitioned(nnx.initializers.ones, (sharding.HEADS,))
    self.scale = param(ones(None, (num_heads,), param_dtype), NORM) if qk_norm else None
    self.scale2 = param(ones(None, (num_heads,), param_dtype), NORM) if qk_norm else None
    attn_in, attn_names = (2, num_heads, head_dim), (None, sharding.HEADS, sharding.HEAD_DIM)
    if variant == 'single':
      self.out = self.attention_gate = self.ffn_norm = None
      # heads stay unsplit here: the kernel's output axis already takes the tensor mesh axis
      self.ffn = StateFFN(attn_in, (None, None, sharding.HEAD_DIM), mlp_dim, dim, activation=mlp_activation, **common)
      self.ffn_gate = Gate(gate, mlp_dim, dim, (sharding.MLP,), **common)
    else:
      self.out = Dense(attn_in, dim, names=(*attn_names, sharding.EMBED), **common)
      self.attention_gate = Gate(gate, attn_in, dim, attn_names, **common)
      if variant == 'dual':
        self.ffn_norm = RMSNorm(dim, eps=norm_eps, param_dtype=param_dtype)
        self.ffn = StateFFN(dim, (sharding.EMBED,), mlp_dim, dim, activation=mlp_activation, **common)
        self.ffn_gate = Gate(gate, mlp_dim, dim, (sharding.MLP,), **common)
      else:
        self.ffn_norm = self.ffn = self.ffn_gate = None

  def new_state(self, batch: int, dtype: jnp.dtype) -> RecurrentState:
    """No state yet (document -1): the first window that ends starts from the learned initial state."""
    return RecurrentState.create(batch, self.num_states, self.dim, self.num_kv_heads, self.head_dim, dtype)

  def flops_per_token(self) -> float:
    """The state side, once per window of W tokens for S states: its q, q2, k, v, its two attentions
    (over the S states and the W (2W) keys it reads), then the output projection, FFN and gates."""
    d, n, k, h, m, s = self.dim, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim, self.num_states
    read_keys = self.window * (2 if self.read_previous_window else 1)
    per_state = 2 * d * (2 * n * h + 2 * k * h) + attention_flops(n, h, s + read_keys)  # tied K/V: the same
    per_state += {'skip': 2 * 2 * n * h * d, 'dual': 2 * 2 * n * h * d + 2 * 3 * d * m,
                  'single': 2 * 2 * (2 * n * h) * m + 2 * m * d}[self.variant]
    if self.gate == 'lstm':  # forget and input projections of each gate's input
      gate_in = {'skip': [2 * n * h], 'dual': [2 * n * h, m], 'single': [m]}[self.variant]
      per_state += sum(2 * 2 * g * d for g in gate_in)
    return s * per_state / self.window

  # -- the cell ------------------------------------------------------------------------------

  def _inputs(self, state: jax.Array) -> jax.Array:
    u = self.norm(state).astype(self.dtype) + self.state_ids[...].astype(self.dtype)
    if u.shape[0] > 1:  # not the initial state's single copy
      u = sharding.constrain(u, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_EMBED))
    return u

  def project(self, state: jax.Array) -> StateProjection:
    """state [B, S, D] (float32) -> its queries, keys and values."""
    u = self._inputs(state)
    q, q2, k, v = self.query(u), self.query2(u), self.key(u), self.value(u)
    if self.qk_norm:
      q, q2, k = l2_normalise(q), l2_normalise(q2), l2_normalise(k)
    return StateProjection(q=q, q2=q2, k=k, v=v)

  def project_kv(self, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """state [B, S, D] -> its keys and values only (what the tokens read)."""
    u = self._inputs(state)
    k = self.key(u)
    return (l2_normalise(k) if self.qk_norm else k), self.value(u)

  def _with_kv(self, carry: RecurrentState, k: jax.Array, v: jax.Array) -> RecurrentState:
    return carry.replace(keys=k.astype(carry.keys.dtype), values=v.astype(carry.values.dtype))

  def _scales(self):
    if self.qk_norm:
      return self.scale[...], self.scale2[...]
    return self.head_dim ** -0.5, self.head_dim ** -0.5

  def initial(self) -> tuple[jax.Array, StateProjection]:
    """The learned initial state [1, S, D] and its projection."""
    init = self.initial_state[...].astype(jnp.float32)[None]
    return init, self.project(init)

  def next_state(self, state: jax.Array, proj: StateProjection, k: jax.Array, v: jax.Array,
                 mask: jax.Array) -> jax.Array:
    """One recurrence step: state [B, S, D] and the window's token keys/values [B, L, K, H] with the
    ones to read `mask` [B, L] -> next state [B, S, D] float32."""
    self_scale, cross_scale = self._scales()
    a_self = attend(proj.q, proj.k, proj.v, None, self_scale)
    a_cross = attend(proj.q2, k, v, jnp.broadcast_to(mask[:, None, :], (*mask.shape[:1], self.num_states,
                                                                           mask.shape[1])), cross_scale)
    a = jnp.stack([a_self, a_cross], axis=-3)  # [B, S, 2, N, H]
    if self.variant == 'single':
      y, hidden = self.ffn(a)
      return self.ffn_gate(state, jnp.tanh(y.astype(jnp.float32)), hidden)
    h = self.attention_gate(state, self.out(a), a)
    if self.variant == 'skip':
      return h
    y, hidden = self.ffn(self.ffn_norm(h).astype(self.dtype))
    return self.ffn_gate(h, y, hidden)

  def advance(self, carry: RecurrentState, proj: StateProjection, init, k: jax.Array, v: jax.Array,
              key_document: jax.Array, window_document: jax.Array, done: jax.Array) -> RecurrentState:
    """The state after a window. key_document [B, L]: documents of the keys the state may read (-1
    elsewhere); window_document [B]: the latest document among the window's tokens; done [B]: the
    window is complete."""
    target = jnp.maximum(carry.document, window_document)
    reset = target != carry.document
    init_state, init_proj = init
    pick = lambda a, b: jnp.where(reset.reshape((-1,) + (1,) * (b.ndim - 1)), a, b)
    base = pick(init_state, carry.state)
    base_proj = jax.tree.map(pick, init_proj, proj)
    mask = (key_document == target[:, None]) & (key_document >= 0)
    new = self.next_state(base, base_proj, k, v, mask)
    apply = done & jnp.any(mask, axis=-1)
    return carry.replace(state=jnp.where(apply[:, None, None], new, carry.state),
                         document=jnp.where(apply, target, carry.document))

  def read(self, q2: jax.Array, scale, sources) -> jax.Array:
    """Tokens read a state: q2 [B, T, N, H]; sources: (k [B or 1, S, K, H], v, visible [B, T]) of
    which each token sees exactly one -> [B, T, N, H]."""
    batch, length = q2.shape[:2]
    ks = [jnp.broadcast_to(k, (batch, *k.shape[1:])) for k, _, _ in sources]
    vs = [jnp.broadcast_to(v, (batch, *v.shape[1:])) for _, v, _ in sources]
    masks = [jnp.broadcast_to(vis[:, :, None], (batch, length, k.shape[1])) for k, _, vis in sources]
    return attend(q2, jnp.concatenate(ks, 1).astype(q2.dtype), jnp.concatenate(vs, 1).astype(q2.dtype),
                  jnp.concatenate(masks, -1), scale)

  # -- drivers ---------------------------------------------------------------------------------

  def blocked(self, layout: Layout, q2: jax.Array, keys: WindowKeys, carry: RecurrentState,
              read_scale) -> tuple[jax.Array, RecurrentState]:
    """Scans the windows of a laid-out call: padded q2 [B, P, N, H] -> what the tokens read from
    the state [B, P, N, H], and the state after the call's last complete window."""
    init = self.initial()
    q_document = layout.windows(keys.document)  # [B, nw, W]
    if self.read_previous_window:
      k = layout.with_previous(keys.k, keys.prev_k)
      v = layout.with_previous(keys.v, keys.prev_v)
      k_document = layout.with_previous(keys.document, keys.prev_document)
    else:
      k, v, k_document = layout.windows(keys.k), layout.windows(keys.v), q_document
    xs = (k, v, k_document, q_document, layout.complete())
    xs = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), xs)  # windows first

    def window_step(carry: RecurrentState, x):
      k_w, v_w, kdoc_w, qdoc_w, done = x
      proj = self.project(carry.state)
      new = self.advance(carry, proj, init, k_w, v_w, kdoc_w, jnp.max(qdoc_w, axis=-1), done)
      return new, (proj.k, proj.v, carry.document)

    carry, (state_k, state_v, state_document) = jax.lax.scan(window_step, carry, xs)
    # The tokens' reads need only each window's starting state: one batched attention, out of the loop.
    state_k, state_v = jnp.moveaxis(state_k, 0, 1), jnp.moveaxis(state_v, 0, 1)  # [B, nw, S, K, H]
    same = q_document == jnp.moveaxis(state_document, 0, 1)[..., None]     # [B, nw, W]
    init_k = jnp.broadcast_to(init[1].k[:, None], state_k.shape)
    init_v = jnp.broadcast_to(init[1].v[:, None], state_v.shape)
    mask = jnp.concatenate([jnp.repeat(same[..., None], self.num_states, -1),
                            jnp.repeat(~same[..., None], self.num_states, -1)], axis=-1)
    read = attend(layout.windows(q2), jnp.concatenate([state_k, init_k], 2).astype(q2.dtype),
                  jnp.concatenate([state_v, init_v], 2).astype(q2.dtype), mask, read_scale)
    return read.reshape(q2.shape), self._with_kv(carry, *self.project_kv(carry.state))

  def flat(self, q2: jax.Array, token_index: jax.Array, documents: jax.Array, k: jax.Array, v: jax.Array,
           k_index: jax.Array, k_document: jax.Array, carry: RecurrentState,
           read_scale) -> tuple[jax.Array, RecurrentState]:
    """T < W new tokens (q2 [B, T, N, H]) with the keys they attended (cache slots and new tokens:
    k/v [B, L, K, H], index/document [B, L]). At most one window ends among the new tokens; the
    tokens after its end read the updated state. A single token (decoding) reads the state's cached
    keys and values (refreshed by every call), and the state is only advanced (lax.cond) when its
    window ends."""
    w, length = self.window, token_index.shape[1]
    ends = (token_index + 1) % w == 0                          # [B, T]
    end_index = jnp.max(jnp.where(ends, token_index, -1), axis=1)  # [B]; -1: no window ends
    ended = end_index // w                                     # the window that ends
    k_window = jnp.where(k_document >= 0, k_index // w, -2)
    in_window = (k_window == ended[:, None]) & (k_index <= end_index[:, None])
    readable = in_window | (self.read_previous_window & (k_window == ended[:, None] - 1))
    window_document = jnp.max(jnp.where(in_window, k_document, -1), axis=1)
    key_document = jnp.where(readable, k_document, -1)
    old_same = documents == carry.document[:, None]

    def advanced(carry: RecurrentState) -> RecurrentState:
      new = self.advance(carry, self.project(carry.state), self.initial(), k, v, key_document,
                         window_document, end_index >= 0)
      return self._with_kv(new, *self.project_kv(new.state))

    if length == 1:  # decoding: the token reads the state of its window's start
      init_k, init_v = jax.lax.cond(jnp.any(~old_same), lambda: self.project_kv(self.initial()[0]),
                                    lambda: (jnp.zeros(carry.keys[:1].shape, self.dtype),) * 2)
      read = self.read(q2, read_scale, [(carry.keys, carry.values, old_same), (init_k, init_v, ~old_same)])
      return read, jax.lax.cond(jnp.any(end_index >= 0), advanced, lambda c: c, carry)
    new = advanced(carry)
    init_k, init_v = self.project_kv(self.initial()[0])
    after = (end_index[:, None] >= 0) & (token_index > end_index[:, None])
    new_same = after & (documents == new.document[:, None])
    old_same &= ~after
    old_k, old_v = self.project_kv(carry.state)  # fresh (a carried cache may predate a parameter update)
    sources = [(old_k, old_v, old_same), (new.keys, new.values, new_same), (init_k, init_v, ~(old_same | new_same))]
    return self.read(q2, read_scale, sources), new


@flax.struct.dataclass
class RecurrentLayerCache:
  kv: KVCache                # the ring of the last window(s) of token keys
  recurrent: RecurrentState


class BlockRecurrentAttention(WindowedAttention):
  """The recurrent layer's mixer: x [B, T, D] -> y = [a_self | a_state] W_o, a_self the windowed
  self-attention (WindowedAttention), a_state each token's read of the state of its window's start
  (query q2 = x W_q2 over the state's keys and values); the cell advances the state at every window end."""

  reads = 2  # W_o reads a_self and a_state

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *, window: int, num_states: int,
               gate: str = 'fixed', variant: str = 'skip', mlp_dim: int = 0, mlp_activation: str = 'silu',
               read_previous_window: bool = False, tie_state_kv: bool = False, norm_eps: float = 1e-6,
               dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs,
               **attention):
    """`attention`: WindowedAttention's options (span, position, qk_norm, ...); `tie_state_kv`: the
    states use the tokens' K/V projections (else their own, as meliad)."""
    super().__init__(dim, num_heads, num_kv_heads, head_dim, window=window, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs, **attention)
    self.read_previous_window = read_previous_window
    self.query2 = Dense(dim, (num_heads, head_dim), names=(sharding.EMBED, sharding.HEADS, sharding.HEAD_DIM),
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ones = sharding.partitioned(nnx.initializers.ones, (sharding.HEADS,))
    self.scale2 = param(ones(None, (num_heads,), param_dtype), NORM) if self.qk_norm else None
    self.cell = BlockRecurrentCell(
        dim, num_heads, num_kv_heads, head_dim, window=window, num_states=num_states, gate=gate, variant=variant,
        mlp_dim=mlp_dim, mlp_activation=mlp_activation, qk_norm=self.qk_norm,
        read_previous_window=read_previous_window, token_kv=(self.key, self.value) if tie_state_kv else None,
        norm_eps=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, segments: Segments,
               cache: RecurrentLayerCache | None = None) -> tuple[jax.Array, RecurrentLayerCache | None]:
    """x [B, T, D] -> y [B, T, D], the cache with this call's keys and the state after its last whole window."""
    q, k, v = self.project(x, segments.positions)
    q2 = self.read_query(x)
    kv = None if cache is None else cache.kv
    carry = self.cell.new_state(x.shape[0], k.dtype) if cache is None else cache.recurrent
    attended, keys = self.attend_tokens(q, k, v, segments, kv)  # [B, T, N, H]
    if isinstance(keys, Blocked):  # the state scanned over whole windows
      read, carry = self.cell.blocked(keys.layout, keys.layout.place(q2), keys.keys, carry, self.read_scale())
      read = keys.layout.take(read)
    else:  # a few new tokens (decoding)
      read, carry = self.cell.flat(q2, segments.index, segments.document, keys.keys, keys.values, keys.index,
                                   keys.document, carry, self.read_scale())
    y = self.out(jnp.stack([attended, read], axis=2))  # [B, T, 2, N, H] -> [B, T, D]
    if cache is None:
      return y, None
    return y, RecurrentLayerCache(kv=kv.write(k, v, segments.index, segments.document), recurrent=carry)

  def read_query(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> q2 [B, T, N, H], the tokens' queries over the state."""
    q2 = self.query2(x)
    if self.qk_norm:
      q2 = l2_normalise(q2)
    return sharding.constrain(q2, (sharding.ACT_BATCH, sharding.ACT_LENGTH, sharding.ACT_HEADS, None))

  def read_scale(self):
    """Scale of the tokens' reads of the state."""
    return self.scale2[...] if self.qk_norm else self.head_dim ** -0.5

  def cache_slots(self) -> int:
    return self.window * (2 if self.span == 'block' or self.read_previous_window else 1)

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> RecurrentLayerCache:
    """The ring of the last window(s) of keys and the state (float32), whatever `max_len`."""
    return RecurrentLayerCache(kv=super().init_cache(batch, max_len, dtype), recurrent=self.cell.new_state(batch, dtype))

  def flops_per_token(self, seq_len: int, doc_lengths: Lengths | None = None) -> float:
    """The windowed self-attention's, plus q2, the wider output projection, the read of S states
    and the cell's state side (once per window)."""
    n, h = self.num_heads, self.head_dim
    read = 2 * self.dim * n * h + 2 * n * h * self.dim + attention_flops(n, h, self.cell.num_states)
    return super().flops_per_token(seq_len, doc_lengths) + read + self.cell.flops_per_token()
