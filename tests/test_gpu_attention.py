"""cuDNN flash attention equals the XLA reference (runs only where a GPU is present).

bf16 inputs; both paths accumulate in float32, so they agree to bf16 rounding.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.documents import locate
from layers.kernels import attention_ops
from tests.helpers import packed_positions, random_tokens, tiny_model

pytestmark = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs a GPU')


# Two rows of documents; padding after them; more documents than the packed cuDNN call describes (dense-mask path).
ROWS = {'packed': [[100, 156], [256]], 'padding': [[100, 100], [30]], 'many_documents': [[12] * 21, [256]]}


@pytest.mark.parametrize('rows', sorted(ROWS))
@pytest.mark.parametrize('window', [None, 64, 256])
@pytest.mark.parametrize('kv_heads', [8, 2, 1])
def test_cudnn_equals_xla(window, kv_heads, rows):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 256, 8, 64)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.normal(size=(2, 256, kv_heads, 64)), jnp.bfloat16) for _ in range(2))
  segments = locate(packed_positions(ROWS[rows], pad_to=256))[0]
  index, documents = segments.index, segments.document
  real = (documents >= 0)[:, :, None, None]  # padding queries' outputs are never used; the two forms differ there
  dy = jnp.where(real, jnp.asarray(rng.normal(size=q.shape), jnp.bfloat16), 0)
  forms = {'xla': lambda q, k, v: attention_ops.xla_attention(
               q, k, v, attention_ops.visibility_mask(index, documents, index, documents, window), 0.125),
           'cudnn': lambda q, k, v: attention_ops.cudnn_self_attention(q, k, v, documents, window, 0.125)}

  def output_and_grads(attend, q, k, v):
    out, pullback = jax.vjp(attend, q, k, v)
    return (jnp.where(real, out, 0),) + pullback(dy)

  results = {name: jax.jit(output_and_grads, static_argnums=0)(attend, q, k, v) for name, attend in forms.items()}
  # Elementwise, within bf16 rounding: outputs up to ~4 (ulp 1/64), gradients summed over grouped heads up to ~16.
  tolerances = (2e-2, 5e-2, 5e-2, 5e-2)
  for name, cudnn, reference, atol in zip(('y', 'dq', 'dk', 'dv'), results['cudnn'], results['xla'], tolerances):
    np.testing.assert_allclose(np.asarray(cudnn, np.float32), np.asarray(reference, np.float32), atol=atol, rtol=1e-2,
                               err_msg=name)


def test_transformer_logits_and_grads_match_across_impls():
  tokens = random_tokens((2, 128), 64)
  positions = packed_positions([[50, 78], [128]])
  results = []
  for impl in ('xla', 'cudnn'):
    model = tiny_model(dtype='bfloat16', attention_impl=impl, window=32, dim=128, num_heads=2, num_kv_heads=1)
    results.append(model(tokens, positions)[0])
  np.testing.assert_allclose(results[1], results[0], atol=5e-2)


@pytest.mark.parametrize('window', [0, 32])
def test_prefill_through_cudnn_equals_chunked_and_forward(window):
  """A prompt into an empty cache goes through cuDNN (lax.cond in layers/mixers/attention.py); in chunks, XLA."""
  model = tiny_model(dtype='bfloat16', attention_impl='cudnn', window=window, dim=128, num_heads=2, num_kv_heads=1)
  tokens = random_tokens((2, 100), 64)
  positions = packed_positions([[40, 60], [100]])
  forward = model(tokens, positions)[0][:, -1]
  for chunk in (0, 16):
    prefill = jax.jit(lambda t, p: model.prefill(t, p, model.init_cache(2, 128, jnp.bfloat16), chunk))
    last, _ = prefill(tokens, positions)
    np.testing.assert_allclose(last[:, 0], forward, atol=5e-2, err_msg=f'chunk {chunk}')
