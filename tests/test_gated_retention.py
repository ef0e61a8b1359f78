"""Gated retention: the parallel, chunked and recurrent forms compute one function
(values and gradients; chunk sizes that do and do not divide T; document starts;
an initial state; strong decays), and the layer follows its equations, resets
at document starts, ignores padding and decodes from its float32 state as one
forward pass does. Shapes are shared between tests to keep compiles few."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.documents import locate
from layers.mixers import gated_retention_ops as ops
from layers.mixers.gated_retention import GatedRetention
from tests.helpers import packed_positions

B, T, N, DK, DV = 2, 24, 2, 4, 3


def inputs(seed=0, with_state=True):
  rng = np.random.default_rng(seed)
  q, k = (jnp.asarray(rng.normal(size=(B, T, N, DK)), jnp.float32) for _ in range(2))
  v = jnp.asarray(rng.normal(size=(B, T, N, DV)), jnp.float32)
  log_decay = np.array(jax.nn.log_sigmoid(rng.normal(size=(B, T, N)) * 2) / 4, np.float32)
  log_decay[1, :, 1] = -30.0  # a head that forgets at once: exp(G_t - G_s) spans e^-700 within the row
  # Row 0 continues the initial state until a document starts at 9 and another at 17;
  # row 1 starts a document at 0 (the state is dropped) and at 5.
  reset = np.zeros((B, T), bool)
  reset[0, [9, 17]] = True
  reset[1, [0, 5]] = True
  state = jnp.asarray(rng.normal(size=(B, N, DK, DV)), jnp.float32) if with_state else None
  return q, k, v, jnp.asarray(log_decay), jnp.asarray(reset), state


def test_parallel_form_is_the_recurrence_written_out():
  q, k, v, log_decay, reset, state = (np.asarray(x, np.float64) for x in inputs())
  o, final = ops.parallel_retention(*inputs())
  for b in range(B):
    for n in range(N):
      s = state[b, n]
      for t in range(T):
        s = (0.0 if reset[b, t] else np.exp(log_decay[b, t, n])) * s + np.outer(k[b, t, n], v[b, t, n])
        np.testing.assert_allclose(o[b, t, n], q[b, t, n] @ s, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(final[b, n], s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('chunk_size,with_state', [(5, True), (8, False)])  # 5 does not divide T=24, 8 does
def test_forms_agree_in_values(chunk_size, with_state):
  args = inputs(with_state=with_state)
  o_ref, s_ref = ops.parallel_retention(*args)
  for name, (o, s) in dict(chunked=ops.chunked_retention(*args, chunk_size=chunk_size),
                           recurrent=ops.recurrent_retention(*args)).items():
    np.testing.assert_allclose(o, o_ref, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(s, s_ref, atol=2e-5, err_msg=name)


def test_forms_agree_in_gradients():
  q, k, v, log_decay, reset, state = inputs(seed=1)
  rng = np.random.default_rng(2)
  w_o = jnp.asarray(rng.normal(size=(B, T, N, DV)), jnp.float32)
  w_s = jnp.asarray(rng.normal(size=(B, N, DK, DV)), jnp.float32)

  def grads(form):
    def loss(q, k, v, log_decay, state):
      o, s = form(q, k, v, log_decay, reset, state)
      return jnp.sum(o * w_o) + jnp.sum(s * w_s)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, log_decay, state)

  reference = grads(ops.parallel_retention)
  for name, form in dict(chunked=lambda *a: ops.chunked_retention(*a, chunk_size=5),
                         recurrent=ops.recurrent_retention).items():
    for g, g_ref in zip(grads(form), reference):
      assert np.all(np.isfinite(g)), name
      np.testing.assert_allclose(g, g_ref, atol=5e-5, err_msg=name)


# The layer ------------------------------------------------------------------------------------

D, HEADS, HEAD, L = 16, 2, 8, 12


def random_params(make_module, seed=0):
  """`make_module()` with parameters drawn by numpy (normal, std 1/sqrt(size / last axis); norm scales near 1).

  The module is built abstractly, so no initialiser is compiled: on CPU those compiles, one per
  parameter shape, cost more than the tests themselves. Tests check identities that hold
  for any parameters; initialisation is the trainer's concern.
  """
  graphdef, state = nnx.split(nnx.eval_shape(make_module))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    if 'scale' in jax.tree_util.keystr(path):  # RMSNorm
      return jnp.asarray(1 + 0.1 * rng.normal(size=x.shape), x.dtype)
    return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.size / x.shape[-1]), x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


@nnx.jit
def apply(mixer, x, positions, cache=None):
  return mixer(x, locate(positions)[0], cache)  # the mixer reads only the positions of its Segments


def layer(**kwargs):
  return random_params(lambda: GatedRetention(D, HEADS, HEAD, chunk_size=5, rngs=nnx.Rngs(0), **kwargs))


def hidden(seed=3, length=L):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(2, length, D)), jnp.float32)


POSITIONS = packed_positions([[12], [5, 7]])


def rope(x):
  """Interleaved RoPE with YOCO's frequencies 1 / 10000^linspace(0, 1, d/2): pairs (2i, 2i+1) turn by p theta_i."""
  angle = np.asarray(POSITIONS, np.float64)[:, :, None, None] * 10000.0 ** -np.linspace(0, 1, HEAD // 2)
  x1, x2 = x[..., 0::2], x[..., 1::2]
  rotated = [x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)]
  return np.stack(rotated, -1).reshape(x.shape)


def test_layer_follows_its_equations():
  """y = (silu(x W_g) * RMSNorm_head(o)) W_o, o from the recurrence with gamma = sigmoid(x W_gamma)^(1/16)."""
  mixer, x = layer(), hidden()
  kernel = lambda m: np.asarray(m.kernel[...], np.float64)
  xs = np.asarray(x, np.float64)
  q, k, v, g = (np.einsum('btd,dnh->btnh', xs, kernel(m)) for m in (mixer.query, mixer.key, mixer.value, mixer.gate))
  q, k = rope(q), rope(k) * HEAD ** -0.5
  gamma = (1 / (1 + np.exp(-xs @ kernel(mixer.decay)))) ** (1 / 16)  # [B, T, N]
  expected = np.zeros((2, L, D))
  for b in range(2):
    s = np.zeros((HEADS, HEAD, HEAD))
    for t in range(L):
      keep = 0.0 if POSITIONS[b, t] == 0 else gamma[b, t][:, None, None]
      s = keep * s + np.einsum('nk,nv->nkv', k[b, t], v[b, t])
      o = np.einsum('nk,nkv->nv', q[b, t], s)
      o = o / np.sqrt(np.mean(o ** 2, axis=-1, keepdims=True) + 1e-5)
      expected[b, t] = np.einsum('nh,nhd->d', g[b, t] / (1 + np.exp(-g[b, t])) * o, kernel(mixer.out))
  np.testing.assert_allclose(apply(mixer, x, POSITIONS)[0], expected, rtol=1e-4, atol=1e-5)


def test_document_start_resets_the_state():
  mixer, x = layer(), hidden()
  changed = x.at[1, :5].set(hidden(seed=9)[1, :5])  # another first document in row 1
  y, y_changed = apply(mixer, x, POSITIONS)[0], apply(mixer, changed, POSITIONS)[0]
  np.testing.assert_array_equal(y[1, 5:], y_changed[1, 5:])
  assert not np.allclose(y[1, :5], y_changed[1, :5])


def test_padding_does_not_disturb_real_tokens():
  mixer, x = layer(), hidden()
  # Row 0: left padding, then a document. Row 1: a document, padding, then the document goes on.
  padded = jnp.asarray([[-1] * 3 + list(range(9)), list(range(5)) + [-1] * 3 + list(range(5, 9))])
  plain = jnp.asarray([list(range(9)) + [-1] * 3, list(range(9)) + [-1] * 3])
  order = [np.r_[3:12, 0:3], np.r_[0:5, 8:12, 5:8]]  # the same real tokens, padding moved to the end
  x_plain = jnp.stack([x[0, order[0]], x[1, order[1]]])
  y_padded, y_plain = apply(mixer, x, padded)[0], apply(mixer, x_plain, plain)[0]
  for b in range(2):
    np.testing.assert_allclose(y_padded[b, order[b][:9]], y_plain[b, :9], atol=1e-5)
  np.testing.assert_array_equal(y_padded[0, :3], 0.0)


def test_prefill_then_recurrent_steps_equal_forward():
  """Row 1 has padding inside the prompt: with a cache, padding leaves the state as it was."""
  mixer, x = layer(), hidden()
  positions = jnp.asarray([list(range(4)) + list(range(8)), list(range(3)) + [-1, -1] + list(range(3, 10))])
  cache = mixer.init_cache(2, L, jnp.float32)
  assert cache.state.shape == (2, HEADS, HEAD, HEAD) and cache.state.dtype == jnp.float32
  y, cache = apply(mixer, x[:, :7], positions[:, :7], cache)
  outs = [y]
  for t in range(7, L):
    y, cache = apply(mixer, x[:, t:t + 1], positions[:, t:t + 1], cache)
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), apply(mixer, x, positions)[0], atol=1e-5)


def test_bfloat16_compute_is_close_to_float32():
  x = hidden()
  f32 = apply(layer(), x, POSITIONS)[0]
  bf16 = apply(layer(dtype=jnp.bfloat16), x.astype(jnp.bfloat16), POSITIONS)[0]
  assert bf16.dtype == jnp.bfloat16
  # The per-head RMSNorm divides by |o|: where q.k is near 0 (a document's first token) it magnifies rounding.
  assert float(jnp.linalg.norm(bf16.astype(jnp.float32) - f32) / jnp.linalg.norm(f32)) < 0.03
