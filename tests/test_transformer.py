"""Transformer: prefill + decode == one forward pass (full, windowed, GQA/MQA,
scanned or looped layers), batched prompts with padding, cache size, FLOPs, config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import architectures
from architectures.base import ConfigError
from layers.flops import mean_visible_keys
from tests.helpers import jitted, packed_positions, random_tokens, tiny_model

VOCAB = 64


def forward(model, tokens, positions):
  return jitted(model)(tokens, positions)[0]


def prefill_and_decode(model, tokens, positions, prompt_len, max_len):
  """Logits from prefilling `prompt_len` tokens, then one single-token step at a time."""
  call = jitted(model)
  cache = model.init_cache(tokens.shape[0], max_len, jnp.float32)
  logits, cache = call(tokens[:, :prompt_len], positions[:, :prompt_len], cache)
  outs = [logits]
  for t in range(prompt_len, tokens.shape[1]):
    logits, cache = call(tokens[:, t:t + 1], positions[:, t:t + 1], cache)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize('window,kv_heads,scan', [
    (0, 2, True), (0, 1, False), (5, 2, True), (5, 4, False), (3, 1, True)])
def test_prefill_then_decode_equals_forward(window, kv_heads, scan):
  model = tiny_model(window=window, num_kv_heads=kv_heads, scan_layers=scan)
  positions = packed_positions([[4, 18], [22]])  # a document start inside the prompt of row 0
  tokens = random_tokens((2, 22), VOCAB)
  full = forward(model, tokens, positions)
  decoded = prefill_and_decode(model, tokens, positions, prompt_len=9, max_len=22)  # 13 steps: rings wrap
  np.testing.assert_allclose(decoded, full, atol=1e-4)


@pytest.mark.parametrize('window', [0, 4])
def test_chunked_prefill_equals_forward(window):
  model = tiny_model(window=window)
  positions = packed_positions([[3, 6, 11], [20]])
  tokens = random_tokens((2, 20), VOCAB, seed=1)
  call, cache = jitted(model), model.init_cache(2, 20, jnp.float32)
  outs = []
  for start, stop in [(0, 7), (7, 8), (8, 17), (17, 20)]:  # chunks shorter and longer than the window
    logits, cache = call(tokens[:, start:stop], positions[:, start:stop], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), forward(model, tokens, positions), atol=1e-4)


def test_left_padded_batch_decodes_each_row_as_alone():
  model = tiny_model(window=4)
  tokens = random_tokens((2, 10), VOCAB, seed=2)
  positions = jnp.asarray([list(range(10)), [-1, -1, -1] + list(range(7))], jnp.int32)
  batched = prefill_and_decode(model, tokens, positions, prompt_len=6, max_len=10)
  alone = prefill_and_decode(model, tokens[1:, 3:], positions[1:, 3:], prompt_len=3, max_len=7)
  np.testing.assert_allclose(batched[1:, 3:], alone, atol=1e-4)
  np.testing.assert_allclose(batched[:1], forward(model, tokens[:1], positions[:1]), atol=1e-4)


def test_cache_bytes_is_exact_and_bounded_by_the_window():
  cfg = dict(num_layers=3, dim=32, num_heads=4, num_kv_heads=2)
  full, windowed = tiny_model(**cfg), tiny_model(window=16, **cfg)
  batch, kv, head_dim = 2, 2, 8
  per_slot = 2 * kv * head_dim * 2 + 2 * 4  # bf16 keys + values, int32 index + document
  cursor = 2 * batch * 4
  assert full.cache_bytes(batch, 1024) == 3 * batch * 1024 * per_slot + cursor
  assert windowed.cache_bytes(batch, 1024) == 3 * batch * 16 * per_slot + cursor
  assert windowed.cache_bytes(batch, 8192) == windowed.cache_bytes(batch, 1024)


def test_flops_are_twice_the_matmul_parameters_plus_attention():
  model = tiny_model(window=8)
  params = nnx.state(model, nnx.Param)
  matmul = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if 'kernel' in jax.tree_util.keystr(path))
  attention = 2 * 2 * 4 * 8 * mean_visible_keys(32, 8) * 2  # 2 flops x (QK, PV) x heads x head_dim x keys x layers
  assert model.flops_per_token(32) == pytest.approx(2 * matmul + attention)
  assert mean_visible_keys(4, 0) == 2.5 and mean_visible_keys(4, 2) == 1.75
  assert mean_visible_keys([2, 2], 0) == 1.5 and mean_visible_keys([1, 3], 2) == 1.5  # keys of its document only
  per_document = 2 * 2 * 4 * 8 * mean_visible_keys([5, 20, 7], 8) * 2  # rows of 3 documents do less work
  assert model.flops_per_token(32, doc_lengths=[5, 20, 7]) == pytest.approx(2 * matmul + per_document)


def test_tied_embeddings_and_soft_cap():
  model = tiny_model(tie_embeddings=True, logits_soft_cap=2.0)
  assert model.io.lm_head is None
  logits = forward(model, random_tokens((1, 8), VOCAB), packed_positions([[8]]))
  assert float(jnp.max(jnp.abs(logits))) < 2.0


def test_last_only_returns_the_last_position():
  model = tiny_model()
  tokens, positions = random_tokens((2, 12), VOCAB), packed_positions([[5, 7], [12]])
  cache = model.init_cache(2, 12, jnp.float32)
  last, _ = jitted(model, last_only=True)(tokens, positions, cache)
  np.testing.assert_allclose(last, forward(model, tokens, positions)[:, -1:], atol=1e-5)


def test_bf16_compute_keeps_float32_params_and_logits():
  model = tiny_model(dtype='bfloat16')
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logits = forward(model, random_tokens((1, 8), VOCAB), packed_positions([[8]]))
  assert logits.dtype == jnp.float32
  reference = forward(tiny_model(dtype='float32'), random_tokens((1, 8), VOCAB), packed_positions([[8]]))
  np.testing.assert_allclose(logits, reference, atol=0.1)


@pytest.mark.parametrize('fields,message', [
    (dict(num_heads=3), r'config\.model\.num_heads=3: does not divide config\.model\.dim=32'),
    (dict(num_kv_heads=3), r'config\.model\.num_kv_heads=3: must divide'),
    (dict(window=-1), r'config\.model\.window=-1'),
    (dict(attention_impl='flash'), r'config\.model\.attention_impl'),
    (dict(dtype='bfloat17'), r'config\.model\.dtype'),
    (dict(num_layer=2), r"config\.model has unknown fields \['num_layer'\]"),
    (dict(name='mamba'), r"config\.model\.name='mamba': unknown model family; known: \[.*'transformer'.*\]"),
])
def test_config_errors_name_the_field(fields, message):
  with pytest.raises(ConfigError, match=message):
    tiny_model(**fields)


def test_registry_lists_families():
  assert 'transformer' in architectures.families()
