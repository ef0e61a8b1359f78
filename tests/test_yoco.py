"""YOCO: prefill with early exit + decode == one forward pass (both self-decoder
mixers, scanned or looped, GQA/MQA), the early exit runs no cross layer over
the prompt, chunked prefill and padded batches, the cache-size formula and its
ratio to a Transformer's, FLOPs (attention counted within documents), configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import architectures
from architectures import yoco
from architectures.base import ConfigError
from experiments.configs import common, transformer as transformer_configs, yoco as yoco_configs
from layers.flops import mean_visible_keys
from layers.mixers.gated_retention import GatedRetention
from tests.helpers import packed_positions, random_tokens
from tests.test_gated_retention import random_params

VOCAB, LENGTH, PROMPT = 64, 22, 9


def tiny_yoco(**fields):
  model_fields = dict(name='yoco', vocab_size=VOCAB, num_layers=4, dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                      window=5, retention_chunk_size=4, dtype='float32', attention_impl='xla')
  model_fields.update(fields)
  return random_params(lambda: architectures.create_model(model_fields, nnx.Rngs(0)))


@nnx.jit(static_argnames='last_only')
def run(model, tokens, positions, cache=None, last_only=False):
  return model(tokens, positions, cache, last_only=last_only)


def decode(model, tokens, positions, cache, start):
  """Single jitted steps from `start` to the end; logits [B, T - start, V] and the final cache."""
  outs = []
  for t in range(start, tokens.shape[1]):
    logits, cache = run(model, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1), cache


ROWS = packed_positions([[4, 18], [LENGTH]])  # row 0 starts a document inside the prompt
TOKENS = random_tokens((2, LENGTH), VOCAB)


@pytest.mark.parametrize('fields', [
    dict(self_mixer='gated_retention'),
    # window 5 < 13 steps: the ring wraps. MQA cross-attention, GQA windows, 1 self + 3 cross layers, scanned.
    dict(self_mixer='sliding_window', num_kv_heads=1, self_num_kv_heads=2, num_self_layers=1, scan_layers=True,
         rope_frequencies='standard'),
], ids=['gret', 'swa-mqa-1self-scan-standard-rope'])
def test_prefill_with_early_exit_then_decode_equals_forward(fields):
  model = tiny_yoco(**fields)
  full = run(model, TOKENS, ROWS)[0]
  cache = model.init_cache(2, LENGTH, jnp.float32)
  last, cache = run(model, TOKENS[:, :PROMPT], ROWS[:, :PROMPT], cache, last_only=True)
  decoded, _ = decode(model, TOKENS, ROWS, cache, PROMPT)
  np.testing.assert_allclose(jnp.concatenate([last, decoded], axis=1), full[:, PROMPT - 1:], atol=1e-4)


def test_early_exit_runs_no_cross_layer_over_the_prompt(monkeypatch):
  """Layer calls are recorded while tracing (nothing is compiled)."""
  model = tiny_yoco()
  seen = []
  for cls in (GatedRetention, yoco.CrossAttention):  # the self and cross layers' mixers
    def record(self, x, *args, _original=cls.__call__, _name=cls.__name__):
      seen.append((_name, x.shape[1]))
      return _original(self, x, *args)
    monkeypatch.setattr(cls, '__call__', record)
  cache = model.init_cache(2, LENGTH, jnp.float32)
  prompt = (TOKENS[:, :PROMPT], ROWS[:, :PROMPT], cache)
  logits, _ = jax.eval_shape(lambda: model(*prompt, last_only=True))
  assert logits.shape == (2, 1, VOCAB)
  # cross layers: the last position only
  assert seen == [('GatedRetention', PROMPT)] * 2 + [('CrossAttention', 1)] * 2
  seen.clear()
  jax.eval_shape(lambda: model(*prompt))
  assert seen == [('GatedRetention', PROMPT)] * 2 + [('CrossAttention', PROMPT)] * 2


def test_chunked_prefill_and_padded_rows_equal_forward():
  model = tiny_yoco()
  # Row 0 packs three documents; row 1 is left-padded.
  positions = jnp.asarray([list(range(3)) + list(range(6)) + list(range(13)), [-1] * 4 + list(range(18))], jnp.int32)
  cache = model.init_cache(2, LENGTH, jnp.float32)
  outs = []
  for start, stop in [(0, PROMPT), (PROMPT, PROMPT + 1), (PROMPT + 1, LENGTH)]:  # T = 9, 1, 12 (chunks of 4)
    logits, cache = run(model, TOKENS[:, start:stop], positions[:, start:stop], cache)
    outs.append(logits)
    if start == 0:  # a prefill with early exit leaves the same cache as one that runs the cross-decoder
      _, early_exit_cache = run(model, TOKENS[:, :PROMPT], positions[:, :PROMPT],
                                model.init_cache(2, LENGTH, jnp.float32), last_only=True)
      for a, b in zip(jax.tree.leaves(early_exit_cache), jax.tree.leaves(cache)):
        np.testing.assert_allclose(a, b, atol=1e-5)
  chunked = jnp.concatenate(outs, axis=1)
  full = run(model, TOKENS, positions)[0]
  np.testing.assert_allclose(chunked[0], full[0], atol=1e-4)
  np.testing.assert_allclose(chunked[1, 4:], full[1, 4:], atol=1e-4)  # logits at padding mean nothing
  # The left-padded row gives what it gives alone (here: moved to the front, padding at the end).
  alone = run(model, jnp.roll(TOKENS, -4, axis=1), jnp.roll(positions, -4, axis=1))[0]
  np.testing.assert_allclose(chunked[1, 4:], alone[1, :LENGTH - 4], atol=1e-4)


def expected_cache_bytes(cfg: yoco.YOCOConfig, batch: int, n: int, itemsize: int) -> int:
  """The formula in architectures/yoco.py: self-decoder states + one global K/V + the cursor."""
  slot_ids = 2 * 4  # int32 token index and document per slot
  global_kv = n * (2 * cfg.kv_heads * cfg.head_dim * itemsize + slot_ids)
  if cfg.self_mixer == 'gated_retention':
    self_decoder = cfg.self_layers * cfg.self_heads * cfg.self_head_dim ** 2 * 4  # float32 states
  else:
    per_slot = 2 * cfg.self_kv_heads * cfg.self_head_dim * itemsize + slot_ids
    self_decoder = cfg.self_layers * min(cfg.window, n) * per_slot
  return batch * (self_decoder + global_kv + 2 * 4)


def abstract(config):
  return nnx.eval_shape(lambda: architectures.create_model(config.model, nnx.Rngs(0)))


@pytest.mark.parametrize('mixer', ['gated_retention', 'sliding_window'])
def test_cache_bytes_formula_and_ratio_to_a_transformer(mixer):
  config = yoco_configs.get_config('160m')
  config.model.self_mixer = mixer
  model = abstract(config)
  cfg = model.config
  for n in (100, 4096, 1 << 20):
    assert model.cache_bytes(3, n) == expected_cache_bytes(cfg, 3, n, 2)  # bf16 cache
  assert model.cache_bytes(1, 8192, jnp.float32) == expected_cache_bytes(cfg, 1, 8192, 4)
  # Only the global K/V grows with the context (once the window is full).
  per_token = 2 * cfg.kv_heads * cfg.head_dim * 2 + 8
  assert model.cache_bytes(1, 1 << 20) - model.cache_bytes(1, 1 << 19) == (1 << 19) * per_token
  # A Transformer of the same depth, width and K/V heads caches every layer's K/V: L * n * per_token + cursor.
  reference = transformer_configs.get_config('150m')
  reference.model = common.model_config('transformer', vocab_size=384, num_layers=12, dim=768, num_heads=12,
                                        num_kv_heads=4, mlp_dim=2048)
  n = 1 << 20
  transformer_bytes = abstract(reference).cache_bytes(1, n)
  assert transformer_bytes == cfg.num_layers * n * per_token + 8
  ratio = transformer_bytes / model.cache_bytes(1, n)
  assert ratio == pytest.approx(transformer_bytes / expected_cache_bytes(cfg, 1, n, 2))
  # -> L = 12 as n grows: 11.97 at 1M tokens with gated retention (6 states of 6 x 128 x 128 floats),
  # 11.79 with sliding windows (6 windows of 1024 MHA slots).
  assert ratio > (11.9 if cfg.self_mixer == 'gated_retention' else 11.7)


def test_cross_layers_have_only_query_and_output_projections():
  model = tiny_yoco()
  params = nnx.state(model, nnx.Param)
  paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  cross = {p for p in paths if p.startswith("['cross_layers']")}
  assert cross and not any("'key'" in p or "'value'" in p for p in cross)
  assert {"['key']['kernel'].value", "['value']['kernel'].value", "['kv_norm']['scale'].value"} <= paths  # one K/V
  assert model.key.kernel.shape == (32, 2, 8)  # GQA: 2 K/V heads of 8


@pytest.mark.parametrize('mixer', ['gated_retention', 'sliding_window'])
def test_flops_are_twice_the_matmul_parameters_plus_mixing(mixer):
  model = tiny_yoco(self_mixer=mixer)
  params = nnx.state(model, nnx.Param)
  matmul = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if 'kernel' in jax.tree_util.keystr(path))
  heads, head_dim, seq = 4, 8, 32
  cross = 2 * 2 * heads * head_dim * mean_visible_keys(seq, 0) * 2  # (QK, AV) x 2 cross layers
  if mixer == 'gated_retention':  # inside a chunk of 4 (QK, AV), then q S and k^T v on a [8, 8] state
    self_mixing = 2 * (2 * 2 * heads * head_dim * mean_visible_keys(4, 0) + 2 * 2 * heads * head_dim * head_dim)
  else:
    self_mixing = 2 * 2 * 2 * heads * head_dim * mean_visible_keys(seq, 5)
  assert model.flops_per_token(seq) == pytest.approx(2 * matmul + cross + self_mixing)


@pytest.mark.parametrize('mixer', ['gated_retention', 'sliding_window'])
def test_attention_flops_are_counted_within_documents(mixer):
  """Rows of documents of 8 and 24 tokens: the cross layers (and windows) see only their document's keys;
  retention chunks are computed whole whatever the documents."""
  model = tiny_yoco(self_mixer=mixer)
  heads, head_dim, seq, docs = 4, 8, 32, [8, 24, 8, 24]
  attention = lambda keys: 2 * 2 * heads * head_dim * keys  # QK and AV per query
  saved = 2 * attention(mean_visible_keys(seq) - mean_visible_keys(docs))  # 2 cross layers
  if mixer == 'sliding_window':
    saved += 2 * attention(mean_visible_keys(seq, 5) - mean_visible_keys(docs, 5))  # 2 self layers
  assert model.flops_per_token(seq) - model.flops_per_token(seq, docs) == pytest.approx(saved)


@pytest.mark.parametrize('fields,message', [
    (dict(self_mixer='mamba'), r"config\.model\.self_mixer='mamba': known: \('gated_retention', 'sliding_window'\)"),
    (dict(num_self_layers=4), r'config\.model\.num_self_layers=4'),
    (dict(num_kv_heads=3), r'config\.model\.num_kv_heads=3: must divide'),
    (dict(self_num_heads=3), r'config\.model\.self_num_heads=3: does not divide'),
    (dict(self_mixer='sliding_window', window=0), r'config\.model\.window=0'),
    (dict(retention_chunk_size=0), r'config\.model\.retention_chunk_size=0'),
    (dict(rope_frequencies='ntk'), r'config\.model\.rope_frequencies'),
])
def test_config_errors_name_the_field(fields, message):
  with pytest.raises(ConfigError, match=message):
    architectures.model_config(dict(name='yoco', num_layers=4, dim=32, num_heads=4, **fields))


def test_configs_select_the_mixer_and_split():
  assert 'yoco' in architectures.families()
  config = yoco_configs.get_config('tiny')
  assert config.model.self_mixer == 'gated_retention'
  config.model.self_mixer = 'sliding_window'  # what --config.model.self_mixer=sliding_window does
  config.model.num_self_layers = 1
  cfg = architectures.model_config(config.model)
  assert (cfg.self_mixer, cfg.self_layers, cfg.cross_layers) == ('sliding_window', 1, 1)
  big = architectures.model_config(yoco_configs.get_config('160m').model)
  assert (big.num_layers, big.dim, big.self_layers, big.cross_layers) == (12, 768, 6, 6)
