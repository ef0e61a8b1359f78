"""Block-Recurrent Transformer: the windowed layer against direct references written here with
explicit masks (attention loop-free over the whole segment; the recurrence as a plain Python loop
over windows), streaming segments with the carried cache, document resets, generation across
window boundaries, config errors. Prefill + decode == forward and sharded == one device for the
tiny config come from tests/test_family_contract.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import architectures
from architectures.base import ConfigError
from architectures.block_recurrent import BlockRecurrentConfig, BlockRecurrentTransformer
from layers.documents import locate
from tests.helpers import jitted, matmul_flops, packed_positions, random_tokens

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, num_layers=2, dim=16, num_heads=2, num_kv_heads=1, mlp_dim=24, window=4,
             num_states=3, recurrent_layers=(0,), dtype='float32')


def brt(**fields):
  return architectures.create_model(dict(name='block_recurrent', **{**SMALL, **fields}), nnx.Rngs(0))


# -- direct references ------------------------------------------------------------------------------

def plain_attention(q, k, v, mask, scale, bias=None):
  """q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S]; heads repeated for GQA, no tricks."""
  rep = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  logits = jnp.einsum('btnh,bsnh->bnts', q, k) * jnp.reshape(jnp.asarray(scale), (-1, 1, 1))
  if bias is not None:
    logits = logits + bias
  logits = jnp.where(mask[:, None], logits, -jnp.inf)
  probs = jnp.nan_to_num(jax.nn.softmax(logits, axis=-1))  # a fully masked row (padding) -> 0
  return jnp.einsum('bnts,bsnh->btnh', probs, v)


def t5_bucket_reference(n, num_buckets, max_distance):
  exact = num_buckets // 2
  with np.errstate(divide='ignore'):
    large = exact + np.floor(np.log(np.maximum(n, 1) / exact) / np.log(max_distance / exact) * (num_buckets - exact))
  return np.where(n < exact, n, np.minimum(large, num_buckets - 1)).astype(np.int32)


def indices_and_documents(positions):
  """Token index and document id of every token, as numpy (constants for the jitted references)."""
  with jax.ensure_compile_time_eval():
    segments = locate(positions)[0]
    token_index, documents = segments.index, segments.document
    return np.asarray(token_index), np.asarray(documents)


def reference_self_attention(attention, q, k, v, positions, cfg):
  """The whole segment at once: mask[i, j] from the rules written out."""
  token_index, d = indices_and_documents(positions)
  i, j = token_index[:, :, None], token_index[:, None, :]
  mask = (d[:, :, None] == d[:, None, :]) & (d[:, None, :] >= 0) & (j <= i)
  mask &= (i - j < cfg.window) if cfg.window_span == 'sliding' else (j // cfg.window >= i // cfg.window - 1)
  scale = attention.scale[...] if cfg.qk_norm else cfg.heads_dim ** -0.5
  bias = None
  if cfg.position == 't5':
    buckets = t5_bucket_reference(np.maximum(i - j, 0), cfg.t5_buckets, cfg.t5_max_distance)
    bias = jnp.moveaxis(attention.relative_bias[...][buckets], -1, 1)  # [B, N, T, S]
    if cfg.qk_norm:
      bias = bias * attention.scale[...][:, None, None]
  return plain_attention(q, k, v, jnp.asarray(mask), scale, bias)


def reference_gate(gate, s, y, x):
  if gate.kind == 'fixed':
    g = jax.nn.sigmoid(gate.bias[...])
    return s * g + y * (1 - g)
  dims = x.ndim - 2  # trailing input axes of the gate's kernel
  lin = lambda dense: jnp.tensordot(x, dense.kernel[...], axes=dims) + dense.bias[...]
  return s * jax.nn.sigmoid(lin(gate.forget) + 1) + y * jax.nn.sigmoid(lin(gate.input) - 1)


def reference_next_state(cell, base, k, v, mask):
  u = cell.norm(base) + cell.state_ids[...]
  q, q2, ks, vs = cell.query(u), cell.query2(u), cell.key(u), cell.value(u)
  if cell.qk_norm:
    norm = lambda x: x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)
    q, q2, ks = norm(q), norm(q2), norm(ks)
  scale, scale2 = (cell.scale[...], cell.scale2[...]) if cell.qk_norm else (cell.head_dim ** -0.5,) * 2
  s = base.shape[1]
  a_self = plain_attention(q, ks, vs, jnp.ones((base.shape[0], s, s), bool), scale)
  a_cross = plain_attention(q2, k, v, jnp.broadcast_to(mask[:, None], (mask.shape[0], s, mask.shape[1])), scale2)
  a = jnp.stack([a_self, a_cross], axis=2)  # [B, S, 2, N, H]
  if cell.variant == 'single':
    hidden = jax.nn.silu(cell.ffn.gate(a)) * cell.ffn.up(a)
    return reference_gate(cell.ffn_gate, base, jnp.tanh(cell.ffn.down(hidden)), hidden)
  h = reference_gate(cell.attention_gate, base, cell.out(a), a)
  if cell.variant == 'skip':
    return h
  n = cell.ffn_norm(h)
  hidden = jax.nn.silu(cell.ffn.gate(n)) * cell.ffn.up(n)
  return reference_gate(cell.ffn_gate, h, cell.ffn.down(hidden), hidden)


def reference_layer(layer, cfg, x, positions):
  """The recurrent layer over a segment from index 0: attention over the whole segment with
  explicit masks, the state advanced by a Python loop over windows. -> (output, state, document)."""
  w, length, batch = cfg.window, x.shape[1], x.shape[0]
  _, documents = indices_and_documents(positions)
  mixer = layer.mixer
  q, k, v = mixer.project(layer.mixer_norm(x), positions)
  q2 = mixer.read_query(layer.mixer_norm(x))
  attended = reference_self_attention(mixer, q, k, v, positions, cfg)
  cell = mixer.cell
  init = jnp.broadcast_to(cell.initial_state[...], (batch, *cell.initial_state.shape))
  kv = lambda s: (lambda u: (cell.key(u), cell.value(u)))(cell.norm(s) + cell.state_ids[...])
  norm = (lambda x: x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)) if cfg.qk_norm else (lambda x: x)
  scale2 = mixer.scale2[...] if cfg.qk_norm else cfg.heads_dim ** -0.5
  state, doc = jnp.zeros_like(init), jnp.full((batch,), -1)
  reads = []
  for start in range(0, length, w):
    sl = slice(start, min(start + w, length))
    docs = documents[:, sl]
    full = jnp.ones((batch, docs.shape[1], cfg.num_states), bool)
    (ks, vs), (ki, vi) = kv(state), kv(init)
    from_state = plain_attention(q2[:, sl], norm(ks), vs, full, scale2)
    from_init = plain_attention(q2[:, sl], norm(ki), vi, full, scale2)
    reads.append(jnp.where((docs == doc[:, None])[..., None, None], from_state, from_init))
    if start + w <= length:  # a whole window: the state advances
      target = jnp.maximum(doc, docs.max(axis=1))
      base = jnp.where((target == doc)[:, None, None], state, init)
      keys = slice(max(start - w, 0) if cfg.state_reads_previous_window else start, start + w)
      mask = documents[:, keys] == target[:, None]
      new = reference_next_state(cell, base, k[:, keys], v[:, keys], mask)
      apply = mask.any(axis=1)
      state = jnp.where(apply[:, None, None], new, state)
      doc = jnp.where(apply, target, doc)
  out = x + mixer.out(jnp.stack([attended, jnp.concatenate(reads, axis=1)], axis=2))
  return out + layer.mlp(layer.mlp_norm(out)), state, doc


# -- the windowed layer == the references ---------------------------------------------------------

POSITIONS = packed_positions([[6, 8, 3], [2, 12], [14]], pad_to=17)  # 17 tokens: the last window is partial


@pytest.mark.parametrize('fields', [
    dict(window=6),  # gate 'fixed', variant 'skip', sliding windows, RoPE
    dict(window_span='block', gate='lstm', variant='dual', state_reads_previous_window=True, num_kv_heads=2,
         num_states=5, window=5),
    dict(position='t5', qk_norm=True, t5_buckets=8, t5_max_distance=12, window=6, variant='single',
         tie_state_kv=True),
])
def test_recurrent_layer_equals_direct_reference(fields):
  cfg = BlockRecurrentConfig(**{**SMALL, **fields})
  layer = BlockRecurrentTransformer.make_block(cfg, True, nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (3, 17, cfg.dim))
  cache = layer.init_cache(3, 17, jnp.float32)
  out, cache = jitted(layer)(x, locate(POSITIONS)[0], cache)
  want, state, doc = jax.jit(lambda x: reference_layer(layer, cfg, x, POSITIONS))(x)
  real = np.asarray(POSITIONS >= 0)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(want)[real], atol=2e-5)
  np.testing.assert_allclose(cache.recurrent.state, state, atol=2e-5)
  np.testing.assert_array_equal(cache.recurrent.document, doc)


def test_windowed_layer_without_recurrence_equals_explicit_mask():
  cfg = BlockRecurrentConfig(**{**SMALL, 'window_span': 'block', 'position': 't5', 't5_buckets': 8,
                                't5_max_distance': 12})
  layer = BlockRecurrentTransformer.make_block(cfg, False, nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(1), (3, 17, cfg.dim))
  out, _ = jitted(layer)(x, locate(POSITIONS)[0], None)

  @jax.jit
  def reference(x):
    q, k, v = layer.mixer.project(layer.mixer_norm(x), POSITIONS)
    want = x + layer.mixer.out(reference_self_attention(layer.mixer, q, k, v, POSITIONS, cfg))
    return want + layer.mlp(layer.mlp_norm(want))

  want = reference(x)
  real = np.asarray(POSITIONS >= 0)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(want)[real], atol=2e-5)


# -- whole model: streaming, resets, generation ---------------------------------------------------

def test_streaming_segments_with_carried_cache_equal_one_pass():
  """Windows follow the token index and the state advances at every whole window, so segments
  of any length (12 and 12 with W=5: the second starts inside a window) continue exactly."""
  model = brt(window=5, gate='lstm', variant='dual')
  tokens = random_tokens((2, 24), VOCAB)
  positions = packed_positions([[24], [9, 15]])  # row 1: a document runs across the segment boundary
  call = jitted(model)
  full = call(tokens, positions)[0]
  carry = model.init_cache(2, 12, jnp.float32)
  first, carry = call(tokens[:, :12], positions[:, :12], carry)
  second, carry = call(tokens[:, 12:], positions[:, 12:], carry)
  np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), full, atol=1e-4)
  assert int(carry.cursor.next_index[0]) == 24
  assert list(np.asarray(carry.layers[0].recurrent.document)) == [1, 2]


def test_state_carries_information_beyond_the_attention_span():
  """One layer, W=4: attention reaches 3 tokens back, so token 0 can change the outputs after
  position 3 only through the recurrent state, and never across a document start."""
  tokens = random_tokens((1, 24), VOCAB)
  changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % VOCAB)
  recurrent, plain = jitted(brt(num_layers=1)), jitted(brt(num_layers=1, recurrent_layers=()))
  delta = lambda call, positions: jnp.abs(call(tokens, positions)[0] - call(changed, positions)[0])[0]
  assert bool(jnp.any(delta(recurrent, packed_positions([[24]]))[20:] > 1e-6))
  assert bool(jnp.all(delta(plain, packed_positions([[24]]))[4:] == 0))
  assert bool(jnp.all(delta(recurrent, packed_positions([[10, 14]]))[10:] == 0))


def test_document_start_resets_state_and_cache_when_streaming():
  """Document 2 starts inside the second segment (index 14, inside window 3): its tokens compute
  the same whatever document 1 held, although both the XL cache and the state came from it."""
  model = brt(num_layers=2, recurrent_layers=(0, 1))
  call = jitted(model)
  tokens = random_tokens((1, 22), VOCAB, seed=3)
  other = tokens.at[:, :14].set(random_tokens((1, 14), VOCAB, seed=5))
  positions = packed_positions([[14, 8]])

  def streamed(tokens):
    carry = model.init_cache(1, 11, jnp.float32)
    _, carry = call(tokens[:, :11], positions[:, :11], carry)
    return call(tokens[:, 11:], positions[:, 11:], carry)[0][0]

  a, b = streamed(tokens), streamed(other)
  np.testing.assert_allclose(a[3:], b[3:], atol=1e-6)  # document 2
  assert bool(jnp.any(jnp.abs(a[:3] - b[:3]) > 1e-4))  # the end of document 1 differs


def decode_all(model, tokens, positions, chunks):
  """Logits of consecutive cached calls of the given lengths (1 = one decode step)."""
  call = jitted(model)
  cache = model.init_cache(tokens.shape[0], tokens.shape[1], jnp.float32)
  outs, start = [], 0
  for n in chunks:
    logits, cache = call(tokens[:, start:start + n], positions[:, start:start + n], cache)
    outs.append(logits)
    start += n
  assert start == tokens.shape[1]
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize('fields', [
    dict(gate='lstm', variant='dual'),
    dict(window_span='block', state_reads_previous_window=True, variant='single', position='t5', qk_norm=True,
         tie_state_kv=True, window=3),
])
def test_generation_across_window_boundaries_equals_forward(fields):
  """A 3-token prompt (shorter than a window: the flat form), single steps across several window
  ends, a 9-token chunk starting inside a window (the blocked form), single steps again; padding
  on the left of row 1 and a document start in row 0."""
  model = brt(**fields)
  tokens = random_tokens((2, 28), VOCAB, seed=4)
  positions = jnp.asarray([list(range(11)) + list(range(17)), [-1, -1] + list(range(26))], jnp.int32)
  full = jitted(model)(tokens, positions)[0]
  decoded, _ = decode_all(model, tokens, positions, [3] + [1] * 7 + [9] + [1] * 9)
  real = np.asarray(positions >= 0)
  np.testing.assert_allclose(np.asarray(decoded)[real], np.asarray(full)[real], atol=1e-4)


def test_last_only_cache_bytes_and_flops():
  model = brt(num_layers=1)
  tokens, positions = random_tokens((2, 10), VOCAB), packed_positions([[10], [10]])
  last, _ = jitted(model, last_only=True)(tokens, positions, model.init_cache(2, 10, jnp.float32))
  np.testing.assert_allclose(last[:, 0], jitted(model)(tokens, positions)[0][:, -1], atol=1e-5)
  assert model.cache_bytes(2, 10, jnp.float32) == model.cache_bytes(2, 10_000, jnp.float32)  # fixed size
  assert model.flops_per_token(64) > brt(num_layers=1, recurrent_layers=()).flops_per_token(64)


@pytest.mark.parametrize('gate', ['fixed', 'lstm'])
@pytest.mark.parametrize('variant', ['skip', 'dual', 'single'])
@pytest.mark.parametrize('read_previous_window', [False, True])
def test_cell_flops_equal_the_matmuls_it_traces(gate, variant, read_previous_window):
  """The cell's analytic FLOPs a token (its state side, once per window) x the window == the dot_generals
  one window's update traces: the state's projections, its two attentions and the rest of the variant."""
  model = brt(gate=gate, variant=variant, state_reads_previous_window=read_previous_window)
  cell = model.layers[0].mixer.cell
  keys = cell.window * (2 if read_previous_window else 1)
  state = jnp.ones((1, cell.num_states, cell.dim), jnp.float32)
  k = v = jnp.ones((1, keys, cell.num_kv_heads, cell.head_dim), jnp.float32)

  def one_window(state, k, v):
    return cell.next_state(state, cell.project(state), k, v, jnp.ones((1, keys), bool))

  assert matmul_flops(one_window, state, k, v) == pytest.approx(cell.flops_per_token() * cell.window)


def test_kernel_self_attention_equals_blocked_form():
  """attention_impl='splash' (Pallas interpret mode here; the same glue as cuDNN): a call without a
  cache and a prompt into an empty cache go through the kernel (qk_norm's per-head scale folded into
  q), a call continuing the cached documents through the blocked form; all equal impl 'xla'."""
  fields = dict(qk_norm=True, tie_state_kv=True)
  ref, kernel = brt(attention_impl='xla', **fields), brt(attention_impl='splash', **fields)
  tokens, positions = random_tokens((2, 128), VOCAB), packed_positions([[50, 78], [128]])
  want = jitted(ref)(tokens, positions)[0]
  np.testing.assert_allclose(jitted(kernel)(tokens, positions)[0], want, atol=1e-5)
  caches = [model.init_cache(2, 256, jnp.float32) for model in (ref, kernel)]
  (want, ref_cache), (got, kernel_cache) = (jitted(m)(tokens, positions, c) for m, c in zip((ref, kernel), caches))
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(jitted(kernel)(tokens, positions + 128, kernel_cache)[0],
                             jitted(ref)(tokens, positions + 128, ref_cache)[0], atol=1e-5)


@pytest.mark.parametrize('fields,match', [
    (dict(recurrent_layers=(2,)), r'config\.model\.recurrent_layers'),
    (dict(recurrent_layers=(0, -2)), r'config\.model\.recurrent_layers=.*twice'),
    (dict(window=0), r'config\.model\.window'),
    (dict(gate='bias'), r'config\.model\.gate'),
    (dict(variant='triple'), r'config\.model\.variant'),
    (dict(window_span='global'), r'config\.model\.window_span'),
    (dict(position='alibi'), r'config\.model\.position'),
    (dict(num_heads=3), r'config\.model\.num_heads'),
    (dict(num_states=0), r'config\.model\.num_states'),
    (dict(scan_layers=True), r'config\.model\.scan_layers=True: BlockRecurrent does not support it'),
    (dict(attention_impl='cudnn', position='t5'), r'config\.model\.attention_impl'),
    (dict(attention_impl='splash', window_span='block'), r'config\.model\.attention_impl'),
])
def test_config_errors_name_the_field(fields, match):
  with pytest.raises(ConfigError, match=match):
    architectures.model_config(dict(name='block_recurrent', **{**SMALL, **fields}))
