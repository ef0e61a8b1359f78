"""Griffin's layers: the linear recurrence's XLA forms (the Pallas scan: test_tpu_kernels.py), the RG-LRU
(equations, resets, padding, recurrent == parallel form, bounded sqrt gradient, hand-written backward == autodiff)
and the document-aware causal conv."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.blocks.conv1d import CausalConv1D
from layers.documents import locate
from layers.kernels import kernel_sharding
from layers.mixers.linear_recurrence import linear_recurrence
from layers.mixers.rg_lru import RGLRU, a_param_init, decays_and_inputs, resolve_impl, rg_lru
from layers.mixers.rg_lru_gates import sqrt_bounded_derivative
from tests.helpers import packed_positions, sharded

IMPLS = ('sequential', 'associative')
LRU_IMPLS = (*IMPLS, 'fused')  # + the Pallas Triton kernel (interpret mode on CPU)
call = nnx.jit(lambda module, *args: module(*args))  # one compile per module shape, instead of op-by-op


def normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def build(make, seed=0):
  """make() built abstractly and filled with numpy normals: no initialiser to compile (seconds on CPU)."""
  module = nnx.eval_shape(make)
  state = nnx.state(module, nnx.Param)
  rng = np.random.default_rng(seed)
  values = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, values)
  nnx.update(module, state)
  return module


def recurrence_inputs(length=37, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.uniform(0.5, 1.0, (2, length, 2, 3))
  a[:, [r for r in (0, 5, 11, 30) if r < length]] = 0.0  # resets
  x = rng.normal(size=a.shape)
  h0 = rng.normal(size=(2, 2, 3))
  return jnp.asarray(a, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(h0, jnp.float32)


def test_linear_recurrence_forms_equal_a_loop_in_values_and_gradients():
  a, x, h0 = recurrence_inputs()
  a = a.at[0, 0].set(0.7)  # row 0 starts from h0, row 1 resets it away
  expected, h = [], np.asarray(h0)
  for t in range(a.shape[1]):
    h = np.asarray(a[:, t]) * h + np.asarray(x[:, t])
    expected.append(h)
  expected = np.stack(expected, 1)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=a.shape), jnp.float32)

  def loss(a, x, h0, impl):
    h, last = linear_recurrence(a, x, h0, impl=impl)
    return jnp.sum(h * weights) + jnp.sum(last ** 2), (h, last)

  grads = {}
  for impl in IMPLS:
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (_, (h, last)), grads[impl] = value_and_grad(a, x, h0, impl)
    np.testing.assert_allclose(h, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, expected[:, -1], rtol=1e-5, atol=1e-5)
  for impl in IMPLS[1:]:
    for g, g_ref in zip(grads[impl], grads['sequential']):
      np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(grads['sequential'][2][1]).max()) == 0.0  # row 1 resets at t = 0: h0 does not matter


@pytest.mark.parametrize('impl', IMPLS)
def test_linear_recurrence_without_initial_state_and_single_steps(impl):
  a, x, _ = recurrence_inputs(length=9, seed=2)
  full, last = jax.jit(linear_recurrence, static_argnames='impl')(a, x, impl=impl)
  h = None
  for t in range(9):
    step, h = linear_recurrence(a[:, t:t + 1], x[:, t:t + 1], h, impl=impl)  # one step: no scan
    np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(h, last, rtol=1e-6, atol=1e-6)


def test_sqrt_bounded_derivative():
  grad = jax.grad(lambda x: sqrt_bounded_derivative(x, 1000.0))
  assert float(sqrt_bounded_derivative(jnp.float32(0.25), 1000.0)) == 0.5
  assert float(grad(jnp.float32(0.25))) == pytest.approx(1.0)
  assert float(grad(jnp.float32(0.0))) == pytest.approx(1000.0)   # sqrt' is infinite at 0
  assert float(grad(jnp.float32(1e-9))) == pytest.approx(1000.0)
  # a = 1 exactly (1 - a^2 = 0): the gradient w.r.t. a is finite, 1000 * d(1 - a^2)/da = -2000.
  grad_a = jax.grad(lambda a: sqrt_bounded_derivative(1 - a ** 2, 1000.0))(jnp.float32(1.0))
  assert np.isfinite(float(grad_a)) and float(grad_a) == pytest.approx(-2000.0)


def test_a_param_init_is_uniform_on_the_ring():
  a_param = a_param_init(0.9, 0.999)(jax.random.key(0), (20000,))
  a = np.asarray(jnp.exp(-jax.nn.softplus(a_param)))
  assert a.min() >= 0.9 - 1e-6 and a.max() <= 0.999 + 1e-6
  assert np.mean(a ** 2) == pytest.approx((0.9 ** 2 + 0.999 ** 2) / 2, abs=2e-3)  # a^2 ~ U(0.81, 0.998)


def make_lru(impl='sequential', width=8, heads=2):
  """An RG-LRU with random gates (biases too) and a_param ~ N(0, 1): a spread of decays."""
  return build(lambda: RGLRU(width, heads, impl=impl, chunk_size=4, rngs=nnx.Rngs(0)))


def lru_by_hand(lru, x, positions):
  """The RG-LRU's equations, token by token in numpy (float64)."""
  def gate(g, xt):  # g = 0: input gate, 1: recurrence gate
    blocks = xt.reshape(lru.gates.num_blocks, -1)
    kernel, bias = np.asarray(lru.gates.kernel[...])[g], np.asarray(lru.gates.bias[...])[g]
    return 1 / (1 + np.exp(-(np.einsum('hi,hij->hj', blocks, kernel) + bias).reshape(-1)))
  x = np.asarray(x, np.float64)
  softplus = np.log1p(np.exp(np.asarray(lru.a_param[...], np.float64)))
  out = np.zeros_like(x)
  for b in range(x.shape[0]):
    h = np.zeros(x.shape[-1])
    for t in range(x.shape[1]):
      if positions[b, t] < 0:
        continue
      i, r = gate(0, x[b, t]), gate(1, x[b, t])
      a = np.exp(-8.0 * r * softplus)
      if positions[b, t] == 0:
        h = i * x[b, t]
      else:
        h = a * h + np.sqrt(1 - a ** 2) * i * x[b, t]
      out[b, t] = h
  return out


def test_rg_lru_equations_with_resets_and_padding():
  lru = make_lru()
  positions = np.asarray(packed_positions([[5, 9, 4], [3, 11]], pad_to=18))  # row 1 ends with 4 pads
  x = normal((2, 18, 8), 2)
  y, last = call(lru, x, jnp.asarray(positions))
  expected = lru_by_hand(lru, x, positions)
  real = positions >= 0
  np.testing.assert_allclose(np.asarray(y)[real], expected[real], rtol=1e-5, atol=1e-5)
  # Padding leaves the state of the last real token.
  np.testing.assert_allclose(last[1], expected[1, 13], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(last[0], expected[0, 17], rtol=1e-5, atol=1e-5)


def test_rg_lru_forms_equal():
  """Parallel forms (three impls), token-by-token decoding and chunked prefill give one answer."""
  positions = packed_positions([[6, 17], [23]])
  x = normal((2, 23, 8), 3)
  h0 = normal((2, 8), 4)
  outputs = {impl: call(make_lru(impl), x, positions, h0) for impl in LRU_IMPLS}
  for impl in LRU_IMPLS[1:]:
    for got, want in zip(outputs[impl], outputs['sequential']):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  lru = make_lru('sequential')
  state, pieces = h0, []
  for start, stop in [(0, 9), (9, 10), (10, 11), (11, 23)]:
    y, state = call(lru, x[:, start:stop], positions[:, start:stop], state)
    pieces.append(y)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), outputs['sequential'][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state, outputs['sequential'][1], rtol=1e-5, atol=1e-5)


def test_rg_lru_left_padding_and_gradients():
  lru = make_lru()
  x = normal((1, 10, 8), 5)
  alone, _ = call(lru, x[:, 3:], packed_positions([[7]]))
  padded, _ = call(lru, x, jnp.asarray([[-1, -1, -1] + list(range(7))], jnp.int32))
  np.testing.assert_allclose(padded[:, 3:], alone, rtol=1e-6, atol=1e-6)
  # Gradients are finite even where a -> 1 (softplus(a_param) -> 0): the bounded sqrt.
  lru.a_param[...] = jnp.full((8,), -30.0)
  graphdef, state = nnx.split(lru)
  grads = jax.jit(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(x, packed_positions([[4, 6]]))[0])))(state)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('impl', LRU_IMPLS)
@pytest.mark.parametrize('a_param_shift', [0.0, -30.0])  # -30: a -> 1, where the sqrt's derivative is bounded
def test_rg_lru_backward_equals_autodiff(impl, a_param_shift):
  """The hand-written VJP against autodiff through the gates and the recurrence, with document starts,
  padding (left, inside, right), an initial state and cotangents on both outputs."""
  positions = jnp.asarray([[-1, -1] + list(range(5)) + list(range(7)) + [-1],
                           list(range(9)) + list(range(3)) + [-1, -1, -1]], jnp.int32)
  x, gate_logits, h0 = normal((2, 15, 8), 6), normal((2, 15, 2, 8), 7), normal((2, 8), 8)
  a_param = normal((8,), 9) + a_param_shift
  d_y, d_last = normal((2, 15, 8), 10), normal((2, 8), 11)

  def custom(x, gate_logits, a_param, h0):
    return rg_lru(x, gate_logits, a_param, positions, h0, impl=impl, chunk_size=4)

  def autodiff(x, gate_logits, a_param, h0):
    return linear_recurrence(*decays_and_inputs(x, gate_logits, a_param, positions, 8.0), h0,
                             impl='sequential' if impl == 'fused' else impl)

  args = (x, gate_logits, a_param, h0)
  (y, last), pullback = jax.vjp(custom, *args)
  (y_ref, last_ref), pullback_ref = jax.vjp(autodiff, *args)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(last, last_ref, rtol=1e-6, atol=1e-6)
  for name, got, want in zip(('x', 'gate_logits', 'a_param', 'state'), pullback((d_y, d_last)),
                             pullback_ref((d_y, d_last))):
    assert bool(jnp.all(jnp.isfinite(got))), name
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_auto_picks_the_fused_kernel_when_compiling_for_gpu(monkeypatch):
  monkeypatch.setattr(kernel_sharding, 'compile_platform', lambda: 'cpu')
  assert resolve_impl('auto') == 'sequential'
  monkeypatch.setattr(kernel_sharding, 'compile_platform', lambda: 'gpu')
  assert resolve_impl('auto') == 'fused'
  with pytest.raises(ValueError, match="unknown RG-LRU impl 'triton'"):
    resolve_impl('triton')


@pytest.mark.parametrize('chunk_size', [8, 1000])  # 8: time split into 4 chunks, composed by the summaries; 1000: one
def test_fused_kernel_equals_xla_form(chunk_size):
  """The fused Pallas kernels (layers/kernels/pallas_rg_lru.py) against the XLA form in values and gradients, over
  several channel blocks (W = 24: 3 blocks of 8), time padded to whole chunks, document starts at chunk
  borders and inside, padding, an initial state and bfloat16 inputs."""
  starts = [0, 5, 16, 17, 40]  # 16: the first step of a chunk of 16 (chunk_size 8 gives 4 chunks of 16)
  positions = np.full((4, 45), -1, np.int32)
  for row, first in enumerate((2, 0, 1, 0)):  # left padding in rows 0 and 2, right padding in rows 1 and 3
    position = 0
    for t in range(first, 45 - 3 * (row % 2)):
      position = 0 if t in starts else position + 1
      positions[row, t] = position
  positions = jnp.asarray(positions)
  x, gate_logits = normal((4, 45, 24), 12).astype(jnp.bfloat16), normal((4, 45, 2, 24), 13).astype(jnp.bfloat16)
  a_param, h0 = normal((24,), 14), normal((4, 24), 15)
  d_y, d_last = normal((4, 45, 24), 16).astype(jnp.bfloat16), normal((4, 24), 17)

  def outputs_and_gradients(impl):
    def fn(x, gate_logits, a_param, h0):
      outputs, pullback = jax.vjp(lambda *args: rg_lru(*args[:3], positions, args[3], impl=impl,
                                                       chunk_size=chunk_size), x, gate_logits, a_param, h0)
      return (*outputs, *pullback((d_y, d_last)))
    return fn

  want = jax.jit(outputs_and_gradients('sequential'))(x, gate_logits, a_param, h0)
  fused = outputs_and_gradients('fused')
  # Alone, and under the 8-device mesh of the CPU tests: rows over data x fsdp, channels over `tensor` (12 a
  # device, blocks of 4). On one GPU, the native kernels alone.
  runs = [jax.jit(fused)(x, gate_logits, a_param, h0)]
  if jax.device_count() >= 8:
    runs.append(sharded(fused, x, gate_logits, a_param, h0))
  for got in runs:
    for name, got_one, want_one in zip(('y', 'last', 'd_x', 'd_gate_logits', 'd_a_param', 'd_state'), got, want):
      assert got_one.dtype == want_one.dtype, name
      np.testing.assert_allclose(np.asarray(got_one, np.float32), np.asarray(want_one, np.float32),
                                 rtol=1e-2 if got_one.dtype == jnp.bfloat16 else 1e-5, atol=1e-5, err_msg=name)


def conv_by_hand(kernel, bias, x, documents):
  width = kernel.shape[0]
  y = np.zeros_like(x) + bias
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for back in range(width):
        s = t - back
        if s >= 0 and documents[b, s] == documents[b, t] and documents[b, s] >= 0:
          y[b, t] += kernel[width - 1 - back] * x[b, s]
  return y


def test_conv_drops_taps_across_document_starts_and_padding():
  conv = build(lambda: CausalConv1D(6, 4, rngs=nnx.Rngs(0)))
  positions = packed_positions([[2, 7, 3], [5, 4]], pad_to=12)  # documents of length 2 (< width), padding in row 1
  documents = locate(positions)[0].document
  x = normal((2, 12, 6), 2)
  y, _ = call(conv, x, documents)
  expected = conv_by_hand(np.asarray(conv.kernel[...]), np.asarray(conv.bias[...]), np.asarray(x), np.asarray(documents))
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
  # Decoding: the state carries the last width - 1 inputs (and their documents) between calls.
  state, pieces = conv.init_state(2, jnp.float32), []
  for start, stop in [(0, 1), (1, 6), (6, 7), (7, 8), (8, 12)]:
    out, state = call(conv, x[:, start:stop], documents[:, start:stop], state)
    pieces.append(out)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), y, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(state.inputs, x[:, -3:])
