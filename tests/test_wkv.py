"""RWKV-6 wkv and the layers around it: the recurrent form is the equations of docs/architectures.md,
GoldFinch, written out in numpy (with and without the bonus u, document resets, an initial state); the
chunked form equals it in values and gradients (chunk sizes that do and do not divide T, one
chunk, sub-chunks of one token; decays near 0 and near 1) and stays finite in bfloat16; so do the
fused Pallas kernels (interpret mode on CPU, alone and on the 8-device mesh), which 'auto' picks on
GPU where they take the sizes; the token shift resets at document starts and continues from its
state; both time-mix variants (Finch with gate and bonus, Finch-C2 with k (1 - w) and a second
value) equal a numpy transcription of their equations. Shapes are shared between tests to keep compiles few."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.blocks import token_shift
from layers.documents import locate
from layers.kernels import kernel_sharding
from layers.mixers import wkv as ops
from layers.mixers.rwkv6 import TimeMix
from tests.helpers import packed_positions, sharded
from tests.test_gated_retention import random_params

B, T, N, DK, DV = 2, 24, 2, 4, 3
# Per-step log decays: w_t = exp(log_w) spread over (0, 1); w_t ~ 0.999; w_t ~ 1e-13 .. 0 (exp(-200)
# underflows in float32, as exp(-exp(w)) does for a decay LoRA output w > 5.3).
DECAYS = {'mixed': (-3.0, -0.01), 'near_one': (-2e-3, -1e-4), 'near_zero': (-200.0, -30.0)}


def inputs(decays='mixed', seed=0, dtype=jnp.float32):
  """r, k, log_w [B, T, N, DK], v [B, T, N, DV], bonus u [N, DK], reset [B, T], initial state [B, N, DK, DV].

  Row 0 continues the initial state until documents start at 9 and 17; row 1 starts one at 0
  (the state is dropped) and at 5."""
  rng = np.random.default_rng(seed)
  r, k = (rng.normal(size=(B, T, N, DK)) for _ in range(2))
  v = rng.normal(size=(B, T, N, DV))
  log_w = rng.uniform(*DECAYS[decays], size=(B, T, N, DK))
  u = rng.normal(size=(N, DK))
  reset = np.zeros((B, T), bool)
  reset[0, [9, 17]] = True
  reset[1, [0, 5]] = True
  state = rng.normal(size=(B, N, DK, DV))
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(r), cast(k), cast(v), jnp.asarray(log_w, jnp.float32), cast(u), jnp.asarray(reset), cast(state)


def naive_wkv(r, k, v, log_w, u, reset, state):
  """S_t = diag(w_t) S_{t-1} + k_t^T v_t, y_t = r_t (S_{t-1} + diag(u) k_t^T v_t), S_{t-1} := 0 at a reset."""
  r, k, v, log_w, state = (np.asarray(x, np.float64) for x in (r, k, v, log_w, state))
  u = np.zeros((N, DK)) if u is None else np.asarray(u, np.float64)
  y = np.zeros((B, T, N, DV))
  final = np.zeros_like(state)
  for b in range(B):
    for n in range(N):
      s = state[b, n]
      for t in range(T):
        if reset[b, t]:
          s = np.zeros_like(s)
        kv = np.outer(k[b, t, n], v[b, t, n])                                  # k_t^T v_t [DK, DV]
        y[b, t, n] = r[b, t, n] @ (s + np.diag(u[n]) @ kv)
        s = np.diag(np.exp(log_w[b, t, n])) @ s + kv
      final[b, n] = s
  return y, final


@pytest.mark.parametrize('bonus', [True, False], ids=['finch', 'finch_c2'])
def test_recurrent_wkv_is_the_equations_written_out(bonus):
  r, k, v, log_w, u, reset, state = inputs()
  u = u if bonus else None  # Finch-C2: no bonus, so a token reaches only later outputs
  y, final = ops.recurrent_wkv(r, k, v, log_w, u, reset, state)
  y_ref, final_ref = naive_wkv(r, k, v, log_w, u, np.asarray(reset), state)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(final, final_ref, rtol=1e-5, atol=1e-5)
  if not bonus:  # y_t = r_t S_{t-1}: nothing of token t, so the first token of a document outputs 0
    np.testing.assert_array_equal(y[1, 0], 0.0)


# chunk 24 = T: one chunk, sub-chunks of 8 (gcd with 16); 8: three chunks of one sub-chunk;
# 7: the tail padded, sub-chunks of one token; 12 with sub-chunks of 4: three sub-chunks per chunk.
CHUNKS = [(24, 16), (8, 16), (7, 16), (12, 4)]


@pytest.mark.parametrize('decays', sorted(DECAYS))
def test_chunked_equals_recurrent_in_values(decays):
  args = inputs(decays)
  y_ref, final_ref = ops.recurrent_wkv(*args)
  for chunk, sub in CHUNKS:
    y, final = ops.chunked_wkv(*args, chunk_size=chunk, sub_chunk_size=sub)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=2e-5, err_msg=f'chunk {chunk}, sub {sub}')
    np.testing.assert_allclose(final, final_ref, rtol=1e-5, atol=2e-5, err_msg=f'chunk {chunk}, sub {sub}')
  no_bonus = args[:4] + (None,) + args[5:]  # Finch-C2, from a zero state
  y, final = ops.chunked_wkv(*no_bonus[:-1], chunk_size=7)
  y_ref, final_ref = ops.recurrent_wkv(*no_bonus[:-1])
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(final, final_ref, rtol=1e-5, atol=2e-5)


@functools.cache
def loss_grad(form, chunk_size=None, sub_chunk_size=16):
  """Gradients of a scalar touching every output, sum(y * a) + sum(final * b) with fixed random a, b,
  w.r.t. r, k, v, log_w, u, state (cached: one compile per form and chunking, shared by the decays)."""
  kwargs = {} if chunk_size is None else dict(chunk_size=chunk_size, sub_chunk_size=sub_chunk_size)
  rng = np.random.default_rng(3)
  a, b = jnp.asarray(rng.normal(size=(B, T, N, DV))), jnp.asarray(rng.normal(size=(B, N, DK, DV)))

  def loss(r, k, v, log_w, u, state, reset):
    y, final = form(r, k, v, log_w, u, reset, state, **kwargs)
    return jnp.sum(y * a) + jnp.sum(final * b)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))


@pytest.mark.parametrize('decays', sorted(DECAYS))
def test_chunked_equals_recurrent_in_gradients(decays):
  r, k, v, log_w, u, reset, state = inputs(decays, seed=1)
  expected = loss_grad(ops.recurrent_wkv)(r, k, v, log_w, u, state, reset)
  for chunk, sub in [(8, 16), (12, 4)]:
    grads = loss_grad(ops.chunked_wkv, chunk, sub)(r, k, v, log_w, u, state, reset)
    for name, g, g_ref in zip(('r', 'k', 'v', 'log_w', 'u', 'state'), grads, expected):
      scale = float(jnp.max(jnp.abs(g_ref))) + 1.0
      np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=2e-5 * scale, err_msg=f'd/d{name}, chunk {chunk}')


def test_bfloat16_inputs_stay_finite_and_close():
  """bf16 r, k, v, u, state (the model's compute dtype); the wkv accumulates in float32 either way."""
  r, k, v, log_w, u, reset, state = inputs('near_zero', dtype=jnp.bfloat16)
  y, final = ops.chunked_wkv(r, k, v, log_w, u, reset, state, chunk_size=8)
  assert y.dtype == final.dtype == jnp.float32
  y_ref, final_ref = ops.recurrent_wkv(r, k, v, log_w, u, reset, state)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  grads = loss_grad(ops.chunked_wkv, 8)(r, k, v, log_w, u, state, reset)
  assert all(g.dtype == x.dtype and bool(jnp.all(jnp.isfinite(g))) for g, x in zip(grads, (r, k, v, log_w, u, state)))


def test_wkv_dispatch_one_token_is_a_step():
  r, k, v, log_w, u, reset, state = inputs()
  y_ref, final_ref = ops.recurrent_wkv(r[:, :3], k[:, :3], v[:, :3], log_w[:, :3], u, reset[:, :3], state)
  y, s = ops.wkv(r[:, :2], k[:, :2], v[:, :2], log_w[:, :2], u, reset[:, :2], state, impl='chunked', chunk_size=8)
  y3, s = ops.wkv(r[:, 2:3], k[:, 2:3], v[:, 2:3], log_w[:, 2:3], u, reset[:, 2:3], s, impl='chunked')
  np.testing.assert_allclose(jnp.concatenate([y, y3], axis=1), y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s, final_ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='unknown wkv impl'):
    ops.wkv(r, k, v, log_w, u, reset, impl='pallas')


# --- fused kernels ---------------------------------------------------------------------------------

def test_auto_picks_the_fused_kernels_on_gpu_where_they_take_the_sizes(monkeypatch):
  monkeypatch.setattr(kernel_sharding, 'compile_platform', lambda: 'cpu')
  assert ops.resolve_impl('auto', 64, 64, 64) == 'chunked'
  monkeypatch.setattr(kernel_sharding, 'compile_platform', lambda: 'gpu')
  assert ops.resolve_impl('auto', 64, 64, 64) == 'fused'
  assert ops.resolve_impl('auto', 64, 64, 48) == 'chunked'   # Triton tiles are powers of two
  assert ops.resolve_impl('auto', 8, 8, 64) == 'chunked'     # matmuls need >= 16
  monkeypatch.setattr(kernel_sharding, 'compile_platform', lambda: 'tpu')
  with pytest.raises(ValueError, match="wkv impl 'fused' is a Pallas Triton kernel for GPUs"):
    ops.resolve_impl('fused', 64, 64, 64)
  r = jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ValueError, match='powers of two >= 16; got d_k=8, d_v=8, chunk_size=64'):
    ops.fused_wkv(r, r, r, r, None, jnp.zeros((1, 4), bool))


def fused_case(seed: int = 5):
  """[4, 80, 2, 16] inputs in float32 (T = 80: 1.25 chunks of 64, 5 of 16), log decays mixing the three ranges
  of DECAYS per element, document starts on sub-chunk and chunk borders (16, 32, 64), next to them (31, 47)
  and inside (5, 70); row 0 continues the initial state throughout; cotangents of y and the last state."""
  rng = np.random.default_rng(seed)
  shape = (4, 80, 2, 16)
  r, k, v = (rng.normal(size=shape) for _ in range(3))
  ranges = np.stack([rng.uniform(*DECAYS[name], size=shape) for name in sorted(DECAYS)])
  log_w = np.take_along_axis(ranges, rng.integers(0, 3, size=(1, *shape)), axis=0)[0]
  reset = np.zeros(shape[:2], bool)
  reset[1, [16, 31, 47]] = True
  reset[2, [0, 32, 70]] = True
  reset[3, [5, 64]] = True
  u, state = rng.normal(size=(2, 16)), rng.normal(size=(4, 2, 16, 16))
  d_y, d_final = rng.normal(size=shape), rng.normal(size=state.shape)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return tuple(map(f32, (r, k, v, log_w, u))), jnp.asarray(reset), f32(state), (f32(d_y), f32(d_final))


@pytest.mark.parametrize('chunk_size', [16, 64])  # 16: one sub-chunk a chunk; 64: four, T padded to 128
def test_fused_kernels_equal_the_recurrent_form_in_values_and_gradients(chunk_size):
  """layers/kernels/pallas_wkv.py (Pallas interpret mode on CPU) against `recurrent_wkv`: y, the last state and the
  gradients in r, k, v, log_w, u and the initial state; alone and, with 8 devices, under the test mesh (rows
  over data x fsdp, heads over tensor); without the bonus too."""
  (r, k, v, log_w, u), reset, state, cotangents = fused_case()

  def outputs_and_gradients(form, **kwargs):
    def fn(r, k, v, log_w, u, state):
      outputs, pullback = jax.vjp(lambda *a: form(*a[:5], reset, a[5], **kwargs), r, k, v, log_w, u, state)
      return (*outputs, *pullback(cotangents))
    return fn

  want = jax.jit(outputs_and_gradients(ops.recurrent_wkv))(r, k, v, log_w, u, state)
  fused = outputs_and_gradients(ops.fused_wkv, chunk_size=chunk_size)
  runs = [jax.jit(fused)(r, k, v, log_w, u, state)]
  if jax.device_count() >= 8:
    runs.append(sharded(fused, r, k, v, log_w, u, state))
  # Float32 throughout on CPU; on a GPU the kernels' float32 matmuls take TF32 inputs (10-bit mantissas).
  tolerance = 1e-4 if jax.default_backend() == 'cpu' else 1e-2
  for got in runs:
    for name, got_one, want_one in zip(('y', 'final', 'd_r', 'd_k', 'd_v', 'd_log_w', 'd_u', 'd_state'), got, want):
      scale = float(jnp.max(jnp.abs(want_one))) + 1.0
      np.testing.assert_allclose(got_one, want_one, rtol=tolerance, atol=tolerance * scale, err_msg=name)
  y, final = jax.jit(functools.partial(ops.fused_wkv, chunk_size=chunk_size))(r, k, v, log_w, None, reset, state)
  y_ref, final_ref = ops.recurrent_wkv(r, k, v, log_w, None, reset, state)
  np.testing.assert_allclose(y, y_ref, rtol=tolerance, atol=tolerance * (float(jnp.max(jnp.abs(y_ref))) + 1.0))
  np.testing.assert_allclose(final, final_ref, rtol=tolerance, atol=tolerance)


# --- token shift ------------------------------------------------------------------------------------

POSITIONS = packed_positions([[5, 7], [12]], pad_to=14)  # row 0: a document starts at 5; both padded at 12, 13


def test_token_shift_resets_at_document_starts_and_continues_from_its_state():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 14, 3)), jnp.float32)
  documents = locate(POSITIONS)[0].document
  shift = jax.jit(token_shift.token_shift)
  x_prev, none = shift(x, documents)
  assert none is None
  expected = np.concatenate([np.zeros((2, 1, 3)), np.asarray(x[:, :-1])], axis=1)
  expected[0, 5] = 0.0  # a document start sees nothing before it
  expected[:, 12:] = 0.0  # padding neither shifts in nor is shifted in
  np.testing.assert_array_equal(x_prev, expected)
  # In pieces, with the state: the same predecessors (the state carries the last input and its document).
  state = token_shift.init_state(2, 3, jnp.float32)
  pieces = []
  for start, stop in [(0, 5), (5, 10), (10, 14)]:  # a document starts the second piece; the third continues one
    piece, state = shift(x[:, start:stop], documents[:, start:stop], state)
    pieces.append(piece)
  np.testing.assert_array_equal(jnp.concatenate(pieces, axis=1), expected)
  np.testing.assert_array_equal(token_shift.lerp(x, x_prev, 0.25), x + (x_prev - x) * 0.25)


# --- time-mix against its equations ---------------------------------------------------------------

D, HEADS, HEAD = 8, 2, 4


def layer_norm(x, scale, bias, axes, eps):
  mean = x.mean(axis=axes, keepdims=True)
  var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def naive_time_mix(p, x, positions, variant):
  """Finch (RWKV-6) or Finch-C2 (docs/architectures.md, GoldFinch) in float64 numpy from the layer's parameters."""
  x = np.asarray(x, np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  documents = locate(positions)[0].document
  documents = np.asarray(documents)
  x_prev = np.zeros_like(x)
  for b in range(x.shape[0]):
    for t in range(1, x.shape[1]):
      if documents[b, t] == documents[b, t - 1] >= 0:
        x_prev[b, t] = x[b, t - 1]
  dx = x_prev - x
  xx = x + dx * p['mix_x']
  branches = ('r', 'k', 'v', 'w', 'g') if variant == 'finch' else ('r', 'k', 'v', 'w', 'v2')
  xs = {name: x + dx * (p['mix'][i] + np.tanh(xx @ p['mix_lora_a'][:, i]) @ p['mix_lora_b'][i])
        for i, name in enumerate(branches)}
  proj = lambda name, h: np.einsum('btd,dnh->btnh', h, p[name]['kernel'])
  r, k, v = proj('receptance', xs['r']), proj('key', xs['k']), proj('value', xs['v'])
  w = np.exp(-np.exp(p['decay'] + np.einsum('btr,rnh->btnh', np.tanh(xs['w'] @ p['decay_lora_a']),
                                            p['decay_lora_b'])))  # w_t in (0, 1)
  pad = (documents < 0)[..., None, None]
  u = p['bonus'] if variant == 'finch' else None
  if variant == 'finch_c2':
    k = k * (1 - w)
  k, w = np.where(pad, 0.0, k), np.where(pad, 1.0, w)
  reset = np.asarray(positions) == 0
  y = np.zeros_like(v)
  for b in range(x.shape[0]):
    for n in range(HEADS):
      s = np.zeros((HEAD, HEAD))
      for t in range(x.shape[1]):
        s = 0 * s if reset[b, t] else s
        kv = np.outer(k[b, t, n], v[b, t, n])
        y[b, t, n] = r[b, t, n] @ (s + (0 if u is None else np.diag(u[n]) @ kv))
        s = np.diag(w[b, t, n]) @ s + kv
  ln = p['ln_x']
  if variant == 'finch':
    g = proj('gate', xs['g'])
    y = layer_norm(y, ln['scale'], ln['bias'], (-1,), 64e-5) * g / (1 + np.exp(-g))  # GroupNorm(y) * silu(g)
  else:
    v2 = proj('value', xs['v2']) + np.einsum('btr,rnh->btnh', np.tanh(xs['v2'] @ p['value2_lora_a']),
                                             p['value2_lora_b'])
    y = layer_norm(y + v2, ln['scale'], ln['bias'], (-2, -1), 1e-5)
  return np.einsum('btnh,nhd->btd', y, p['output']['kernel'])


@pytest.mark.parametrize('variant', ['finch', 'finch_c2'])
def test_time_mix_follows_its_equations_and_decodes_as_one_pass(variant):
  mix = random_params(lambda: TimeMix(D, HEADS, HEAD, layer=1, num_layers=3, variant=variant, mix_rank=3,
                                      decay_rank=5, chunk_size=8, rngs=nnx.Rngs(0)))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 14, D)), jnp.float32)
  segments = locate(POSITIONS)[0]
  run = nnx.jit(lambda m, x, segments, cache: m(x, segments, cache))
  y, _ = run(mix, x, segments, None)
  expected = naive_time_mix(nnx.to_pure_dict(nnx.state(mix, nnx.Param)), x, POSITIONS, variant)
  np.testing.assert_allclose(y[:, :12], expected[:, :12], rtol=1e-4, atol=1e-4)  # outputs at padding mean nothing
  cache, pieces = mix.init_cache(2, 14, jnp.float32), []
  for start, stop in [(0, 7), (7, 14)]:  # the second continues a document across the call (and one starts at 5)
    piece, cache = run(mix, x[:, start:stop], jax.tree.map(lambda a: a[:, start:stop], segments), cache)
    pieces.append(piece)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1)[:, :12], y[:, :12], rtol=1e-5, atol=1e-5)
