"""Prefill at long context: scores built in blocks of queries equal the scores built whole; a long
prompt's prefill, in chunks or in one call, holds no [T, T] array (the compiled program's memory
says so, without running it); the sampler generates the same tokens whatever `prefill_chunk`; bad
requests are refused by name. (prefill == forward for every family: test_family_contract.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.documents import locate
from layers.kernels import attention_ops
from tests.helpers import packed_positions, random_tokens, tiny_model
from trainers.inference.sampling import generate
from trainers.measurement.decode_speed import program_bytes

PROMPT = 4096


@pytest.mark.parametrize('window', [None, 6])
def test_scores_in_blocks_of_queries_equal_scores_whole(window, monkeypatch):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 37, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 50, 2, 8)), jnp.float32) for _ in range(2))
  segments = locate(packed_positions([[20, 17], [30]], pad_to=37))[0]
  q_index, q_document = segments.index, segments.document
  segments = locate(packed_positions([[20, 30], [44]], pad_to=50))[0]
  k_index, k_document = segments.index, segments.document
  attend = lambda: attention_ops.attend_visible(q, k, v, q_index, q_document, k_index, k_document, window, 0.3)
  whole = attend()
  monkeypatch.setattr(attention_ops, 'DENSE_SCORES_LIMIT', 0)
  monkeypatch.setattr(attention_ops, 'BLOCK_SCORES', 2 * 4 * 50 * 8)  # blocks of 8 queries: 5, the last padded
  np.testing.assert_allclose(attend(), whole, atol=1e-6)


def prefill_program_bytes(model, chunk: int) -> int:
  """Bytes the compiled prefill of a PROMPT-token prompt (one document) needs, compiled, not run."""
  graphdef, state = nnx.split(model)

  def prefill(state, tokens, positions):
    model = nnx.merge(graphdef, state)
    return model.prefill(tokens, positions, model.init_cache(1, PROMPT, jnp.float32), chunk)

  tokens = jax.ShapeDtypeStruct((1, PROMPT), jnp.int32)
  return program_bytes(jax.jit(prefill).lower(state, tokens, tokens).compile())


def test_a_long_prompt_is_prefilled_without_a_t_by_t_array(monkeypatch):
  model = tiny_model(num_heads=4, num_kv_heads=4)
  scores = 4 * PROMPT * PROMPT * 4  # [heads, T, T] float32: 256 MiB
  whole = prefill_program_bytes(model, 0)  # below DENSE_SCORES_LIMIT the XLA form builds them at once
  assert whole > scores
  chunked = [prefill_program_bytes(model, chunk) for chunk in (64, 256)]
  assert chunked[1] < scores / 4 and chunked[0] < chunked[1] / 2  # O(chunk x T)
  monkeypatch.setattr(attention_ops, 'DENSE_SCORES_LIMIT', 1 << 22)  # as a 128K prompt meets the default
  monkeypatch.setattr(attention_ops, 'BLOCK_SCORES', 1 << 20)
  assert prefill_program_bytes(model, 0) < scores / 8


def test_chunked_prefill_generates_the_same_tokens():
  model = tiny_model(window=5)
  prompts = [list(np.asarray(random_tokens((23,), 64))), [3, 1, 4, 1, 5]]
  whole = generate(model, prompts, 6, cache_dtype=jnp.float32)
  for chunk in (4, 7):
    for tokens, expected in zip(generate(model, prompts, 6, cache_dtype=jnp.float32, prefill_chunk=chunk), whole):
      np.testing.assert_array_equal(tokens, expected)


def test_bad_prefill_requests_are_named():
  model = tiny_model()
  tokens = random_tokens((1, 12), 64)
  positions = jnp.arange(12, dtype=jnp.int32)[None]
  with pytest.raises(ValueError, match='a prompt of 12 tokens is longer than the cache, built for 8'):
    model.prefill(tokens, positions, model.init_cache(1, 8, jnp.float32))
  with pytest.raises(ValueError, match='prefill chunk=-1: must be >= 0'):
    model.prefill(tokens, positions, model.init_cache(1, 12, jnp.float32), chunk=-1)
  with pytest.raises(ValueError, match='prefill_chunk=-2: must be >= 0'):
    generate(model, [[1, 2]], 3, prefill_chunk=-2)
