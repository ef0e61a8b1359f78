"""Aaren: the prefix scan equals softmax attention with a constant query (values
and gradients, at large score magnitudes, across documents and padding); the
chunked form and the token-by-token recurrence equal the scan; the decode
cache does not grow with context. The scans run jitted: eagerly, each of their many small ops
compiles on its own (minutes on CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from architectures.aaren import Aaren, AarenConfig
from layers.documents import locate
from layers.mixers.aaren import AarenState, aaren_chunked, aaren_scan
from tests.helpers import packed_positions

B, T, H, D = 2, 21, 3, 4
POSITIONS = packed_positions([[5, 11], [17]], pad_to=T)  # a document start in row 0, padding at both ends


def inputs(scale: float, seed: int = 0):
  rng = np.random.default_rng(seed)
  scores = jnp.asarray(rng.normal(size=(B, T, H)) * scale, jnp.float32)
  values = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
  return scores, values, locate(POSITIONS)[0].document


def softmax_attention(scores, values, documents):
  """Causal softmax attention of one constant query: the scores are already q . k_j."""
  same = (documents[:, :, None] == documents[:, None, :]) & (documents[:, None, :] >= 0)
  visible = same & jnp.tril(jnp.ones((T, T), bool))                                  # [B, Tq, Tk]
  logits = jnp.where(visible[..., None], scores[:, None, :, :], -jnp.inf)            # [B, Tq, Tk, H]
  weights = jax.nn.softmax(logits, axis=2)
  out = jnp.einsum('bqkh,bkhd->bqhd', jnp.nan_to_num(weights), values)
  return jnp.where((documents >= 0)[..., None, None], out, 0.0)


def empty():
  return AarenState.create(B, H, D)


@pytest.mark.parametrize('scale', [1.0, 1e3])  # 1e3: exp(s) overflows float32 without the max subtraction
def test_scan_equals_softmax_attention_values_and_gradients(scale):
  scores, values, documents = inputs(scale)
  out, _ = jax.jit(aaren_scan)(scores, values, documents, empty())
  np.testing.assert_allclose(out, softmax_attention(scores, values, documents), atol=1e-5)
  assert np.all(np.isfinite(out))
  loss = lambda f: lambda s, v: jnp.sum(jnp.sin(f(s, v)))
  grads = jax.jit(jax.grad(loss(lambda s, v: aaren_scan(s, v, documents, empty())[0]), argnums=(0, 1)))(scores, values)
  reference = jax.jit(jax.grad(loss(lambda s, v: softmax_attention(s, v, documents)), argnums=(0, 1)))(scores, values)
  for g, r in zip(grads, reference):
    np.testing.assert_allclose(g, r, atol=1e-4)


@pytest.mark.parametrize('chunk_size', [1, 4, 7, 21, 32])
def test_chunked_equals_scan(chunk_size):
  scores, values, documents = inputs(30.0, seed=1)
  scan_out, scan_state = jax.jit(aaren_scan)(scores, values, documents, empty())
  chunk_out, chunk_state = jax.jit(aaren_chunked, static_argnums=4)(scores, values, documents, empty(), chunk_size)
  np.testing.assert_allclose(chunk_out, scan_out, atol=1e-5)
  for a, b in zip(jax.tree.leaves(scan_state), jax.tree.leaves(chunk_state)):
    np.testing.assert_allclose(b, a, atol=1e-5)
  grad = lambda f: jax.jit(jax.grad(lambda s: jnp.sum(f(s)[0] ** 2)))(scores)
  np.testing.assert_allclose(grad(lambda s: aaren_chunked(s, values, documents, empty(), chunk_size)),
                             grad(lambda s: aaren_scan(s, values, documents, empty())), atol=1e-4)


@pytest.mark.parametrize('impl', ['scan', 'chunked'])
def test_token_by_token_equals_one_pass(impl):
  scores, values, documents = inputs(10.0, seed=2)
  fn = jax.jit(aaren_scan if impl == 'scan' else lambda *a: aaren_chunked(*a, 4))
  full, _ = fn(scores, values, documents, empty())
  state, outs = empty(), []
  for t in range(T):
    out, state = fn(scores[:, t:t + 1], values[:, t:t + 1], documents[:, t:t + 1], state)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_cache_is_constant_in_context_length():
  model = Aaren(AarenConfig(vocab_size=64, dim=32, num_heads=4, mlp_dim=64, dtype='float32'), rngs=nnx.Rngs(0))
  assert model.cache_bytes(2, 128) == model.cache_bytes(2, 65536)
  # Per layer (m, u, w, document): (2 + head_dim) float32 per head, one int32, per row; plus the cursor.
  assert model.cache_bytes(2, 128) == 2 * 2 * (4 * (2 + 8) * 4 + 4) + 2 * 2 * 4
  with pytest.raises(ValueError, match=r'config\.model\.window=8: Aaren attends over the whole prefix'):
    AarenConfig(window=8)
