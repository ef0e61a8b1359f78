"""Griffin / Hawk: logits equal recurrentgemma 1.0.1's with its weights ported (float32, documents
packed in a row, cached decoding past the window), sampling from its saved weights with a SentencePiece
tokenizer in Gemma's layout, scanned == looped layers, padding, cache, FLOPs, config errors, the published
shapes' parameter counts.

The parity tests need the reference: pip install --no-deps -r tests/reference_requirements.txt
Models of one shape share compiled functions across tests (CALL is keyed by the graph definition).
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import architectures
from architectures import griffin_convert
from architectures.base import ConfigError
from layers.flops import mean_visible_keys
from tests.helpers import REPO, packed_positions, random_tokens, stdlib_slice
from trainers import tokenizer
from trainers.inference.sampling import generate

VOCAB, LENGTH, PROMPT = 64, 24, 9
# Blocks r, r, a | r (one group of the pattern, then a tail); window 5 = recurrentgemma's 4.
SMALL = dict(name='griffin', vocab_size=VOCAB, num_layers=4, dim=32, num_heads=4, lru_width=48, mlp_dim=96,
             window=5, dtype='float32', attention_impl='xla')
TOKENS = random_tokens((2, LENGTH), VOCAB)
POSITIONS = packed_positions([[PROMPT, LENGTH - PROMPT], [LENGTH]])  # row 0: a document starts at index 9

CALL = jax.jit(lambda graphdef, state, tokens, positions, cache: nnx.merge(graphdef, state)(tokens, positions, cache),
               static_argnums=0)


def random_like(tree, seed=0, scale=0.1):
  """Normal(0, scale^2) arrays shaped like `tree`'s leaves, from numpy: no JAX random op to compile."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), tree)


def model(**fields):
  """A Griffin of SMALL's shape (with `fields` changed), random weights; built abstractly, so no init
  is compiled (compiling the initialisers of a new shape costs seconds on CPU)."""
  abstract = nnx.eval_shape(lambda: architectures.create_model({**SMALL, **fields}, nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  nnx.replace_by_pure_dict(state, random_like(nnx.to_pure_dict(state)))
  nnx.update(abstract, state)
  return abstract


def forward(m, tokens=TOKENS, positions=POSITIONS):
  return CALL(*nnx.split(m), tokens, positions, None)[0]


def decode(m, tokens=TOKENS, positions=POSITIONS, prompt_len=PROMPT):
  """Prefill `prompt_len` tokens, then one token at a time; the logits of every position."""
  graphdef, state = nnx.split(m)
  logits, cache = CALL(graphdef, state, tokens[:, :prompt_len], positions[:, :prompt_len],
                       m.init_cache(tokens.shape[0], tokens.shape[1], jnp.float32))
  outs = [logits]
  for t in range(prompt_len, tokens.shape[1]):
    logits, cache = CALL(graphdef, state, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


# --- Parity with recurrentgemma ------------------------------------------------------------------

@pytest.fixture(scope='module')
def reference():
  """recurrentgemma's Griffin (blocks r, r, a, r; window 4) with random weights, and its logits."""
  rg = pytest.importorskip('recurrentgemma.jax')
  r, a = rg.TemporalBlockType.RECURRENT, rg.TemporalBlockType.ATTENTION
  config = rg.GriffinConfig(vocab_size=VOCAB, width=32, mlp_expanded_width=96, num_heads=4, lru_width=48,
                            block_types=(r, r, a, r), embeddings_scale_by_sqrt_dim=True, attention_window_size=4,
                            logits_soft_cap=30.0, scan_type=rg.ScanType.LINEAR_NATIVE)
  ref = rg.Griffin(config, gradient_checkpointing=False)
  # Random values in every leaf (norm scales and biases too, which start at 0), so that each one matters.
  params = random_like(jax.eval_shape(ref.init, jax.random.key(1), TOKENS, POSITIONS), seed=1, scale=0.2)
  logits, _ = jax.jit(ref.apply)(params, TOKENS, POSITIONS)
  return params, logits


def test_logits_and_cached_decoding_equal_recurrentgemma(reference):
  params, expected = reference
  fields = griffin_convert.config_fields_from_reference(params, reference_window=4, dtype='float32',
                                                        attention_impl='xla')
  assert {k: fields[k] for k in ('window', 'block_pattern', 'lru_width', 'num_heads', 'mlp_dim')} == dict(
      window=5, block_pattern='rra', lru_width=48, num_heads=4, mlp_dim=96)
  ours = nnx.eval_shape(lambda: architectures.create_model(dict(name='griffin', **fields), nnx.Rngs(0)))
  griffin_convert.load_reference_params(ours, params)  # fills the abstract model with the reference's arrays
  forward_diff = float(jnp.max(jnp.abs(forward(ours) - expected)))
  # Cached decoding: prefill 9 tokens, then 15 single steps, past the window of 5 (the ring wraps).
  decode_diff = float(jnp.max(jnp.abs(decode(ours) - expected)))
  print(f'max |logits - recurrentgemma|: forward {forward_diff:.2e}, prefill + decode {decode_diff:.2e}')
  assert forward_diff < 1e-4 and decode_diff < 1e-4


def test_converter_stacks_scanned_groups_and_checks_the_layout(reference):
  params = reference[0]
  looped, scanned = model(), model(scan_layers=True)
  griffin_convert.load_reference_params(looped, params)
  griffin_convert.load_reference_params(scanned, params)
  looped, scanned = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (looped, scanned))
  jax.tree.map(lambda s, l: np.testing.assert_array_equal(s[0], l), scanned['groups'], looped['groups'][0])
  jax.tree.map(np.testing.assert_array_equal, scanned['tail'], looped['tail'])
  with pytest.raises(ValueError, match='reference blocks are'):
    griffin_convert.load_reference_params(model(block_pattern='r'), params)
  with pytest.raises(ValueError, match='shape'):
    griffin_convert.load_reference_params(model(lru_width=32), params)


@pytest.fixture(scope='module')
def gemma_like_tokenizer(tmp_path_factory) -> str:
  """A tiny SentencePiece model in the layout of Gemma's released tokenizer.model (pad 0, eos 1, bos 2, unk 3,
  byte fallback, no normalisation), trained offline on the embedded corpus; its path."""
  sentencepiece = pytest.importorskip('sentencepiece')
  path = tmp_path_factory.mktemp('gemma') / 'tokenizer.model'
  lines = [line for document in stdlib_slice(100_000) for line in document.decode('utf-8').splitlines()]
  with open(path, 'wb') as model:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        byte_fallback=True, normalization_rule_name='identity', add_dummy_prefix=False, minloglevel=2)
  return str(path)


def test_recurrentgemma_weights_sample_with_their_tokenizer(gemma_like_tokenizer, tmp_path):
  """experiments.sample_recurrentgemma on recurrentgemma weights saved as it saves them (random, blocks r r a,
  window 4), with --tokenizer standing in for the released tokenizer.model: prompts start with its BOS."""
  rg = pytest.importorskip('recurrentgemma.jax')
  tok = tokenizer.load(gemma_like_tokenizer)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (400, 2, 1)
  r, a = rg.TemporalBlockType.RECURRENT, rg.TemporalBlockType.ATTENTION
  config = rg.GriffinConfig(vocab_size=tok.vocab_size, width=32, mlp_expanded_width=96, num_heads=4, lru_width=48,
                            block_types=(r, r, a), embeddings_scale_by_sqrt_dim=True, attention_window_size=4,
                            logits_soft_cap=30.0)
  params = random_like(jax.eval_shape(rg.Griffin(config).init, jax.random.key(2), TOKENS, POSITIONS), seed=2)
  checkpoint = tmp_path / 'weights'
  rg.utils.save_parameters(str(checkpoint), params['params'])
  process = subprocess.run(
      [sys.executable, '-m', 'experiments.sample_recurrentgemma', f'--checkpoint={checkpoint}',
       f'--tokenizer={gemma_like_tokenizer}', '--window=4', '--dtype=float32', '--prompt=def f(x):',
       '--max_new_tokens=6', '--temperature=0'],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert process.returncode == 0, process.stderr[-3000:]
  ours = griffin_convert.model_from_reference(params, reference_window=4, dtype='float32', param_dtype='float32')
  new = generate(ours, [[tok.bos_id, *tok.encode('def f(x):')]], 6, eos_id=tok.eos_id, cache_dtype=jnp.float32)[0]
  text = tok.decode(new).decode('utf-8', errors='replace')
  assert len(new) and process.stdout == f"--- 'def f(x):'\ndef f(x):{text}\n\n"


# --- Our own model -------------------------------------------------------------------------------

def test_scanned_layers_equal_looped_layers_and_decode():
  looped, scanned = model(num_layers=5, block_pattern='ra'), model(num_layers=5, block_pattern='ra', scan_layers=True)
  # Same weights: looped group g, block j is scanned block j at index g; the tail (layer 4) is the same.
  state = nnx.to_pure_dict(nnx.state(looped, nnx.Param))
  groups = [state['groups'][g]['blocks'] for g in (0, 1)]
  target = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(target, {**state, 'groups': dict(blocks={
      j: jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[j] for blocks in groups]) for j in (0, 1)})})
  nnx.update(scanned, target)
  full = forward(scanned)
  np.testing.assert_allclose(full, forward(looped), atol=1e-5)
  np.testing.assert_allclose(decode(scanned), full, atol=1e-4)


def test_left_padding_does_not_change_a_row():
  m = model()
  positions = jnp.asarray([list(range(LENGTH)), [-1, -1, -1] + list(range(LENGTH - 3))], jnp.int32)
  alone = forward(m, TOKENS[1:, 3:], positions[1:, 3:])
  np.testing.assert_allclose(forward(m, TOKENS, positions)[1:, 3:], alone, atol=1e-4)
  np.testing.assert_allclose(decode(m, TOKENS, positions)[1:, 3:], alone, atol=1e-4)


def test_last_only_and_bf16_compute():
  m = model()
  graphdef, state = nnx.split(m)
  last, _ = jax.jit(lambda s, c: nnx.merge(graphdef, s)(TOKENS, POSITIONS, c, last_only=True))(
      state, m.init_cache(2, LENGTH, jnp.float32))
  full = forward(m)
  np.testing.assert_allclose(last, full[:, -1:], atol=1e-5)
  low = model(dtype='bfloat16')
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(low, nnx.Param)))
  logits, cache = CALL(*nnx.split(low), TOKENS, POSITIONS, low.init_cache(2, LENGTH, jnp.bfloat16))
  assert logits.dtype == jnp.float32 and cache.layers['groups'][0][0].lru.dtype == jnp.float32
  np.testing.assert_allclose(logits, full, atol=0.1)


def test_embedding_scale_is_rounded_to_bf16():
  io = model(dim=48).io  # float32 compute: rounded to bf16 all the same
  assert io.scale_embeddings and io.input_scale == 6.9375 != 48 ** 0.5  # sqrt(48) = 6.928...
  assert not model(scale_embeddings=False).io.scale_embeddings


def test_cache_is_recurrent_state_plus_a_window_ring():
  m = model()  # r r a | r
  recurrent = 48 * 4 + 3 * 48 * 2 + 3 * 4  # float32 state, bf16 conv inputs (last 3), their int32 documents
  ring = 5 * (2 * 8 * 2 + 2 * 4)           # 5 slots of bf16 K and V (one head of 8) + int32 index, document
  assert m.cache_bytes(2, 1000) == 2 * (3 * recurrent + ring) + 2 * 2 * 4  # + cursor
  assert m.cache_bytes(2, 10 ** 6) == m.cache_bytes(2, 1000)  # bounded in the context length


def test_flops_count_every_weight_twice_plus_attention_conv_and_scan():
  m = model()
  params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  weights = sum(x.size for path, x in paths
                if jax.tree_util.keystr(path).endswith("['kernel']") and "['conv']" not in jax.tree_util.keystr(path))
  tied_logits = VOCAB * 32
  attention = 2 * 2 * 4 * 8 * mean_visible_keys(64, 5)
  conv_and_scan = 3 * (2 * 4 * 48 + 2 * 48)
  assert m.flops_per_token(64) == pytest.approx(2 * (weights + tied_logits) + attention + conv_and_scan)


@pytest.mark.parametrize('fields,message', [
    (dict(num_heads=3), r'config\.model\.num_heads=3: does not divide config\.model\.dim=32'),
    (dict(num_heads=8, lru_width=36), r'config\.model\.num_heads=8: does not divide config\.model\.lru_width=36'),
    (dict(block_pattern='rrx'), r"config\.model\.block_pattern='rrx'"),
    (dict(block_pattern=''), r"config\.model\.block_pattern=''"),
    (dict(lru_impl='triton'), r"config\.model\.lru_impl='triton'"),
    (dict(lru_max_rad=1.5), r'config\.model\.lru_max_rad=1\.5'),
    (dict(window=-1), r'config\.model\.window=-1'),
    (dict(conv_width=0), r'config\.model\.conv_width=0'),
    (dict(rope_fraction=0.1), r'config\.model\.rope_fraction=0\.1'),
])
def test_config_errors_name_the_field(fields, message):
  with pytest.raises(ConfigError, match=message):
    architectures.model_config({**SMALL, **fields})


def test_published_shapes_have_the_reference_parameter_counts():
  """Counted without allocating; recurrentgemma's own count for its 2B preset (vocab 256000)."""
  from experiments.configs import griffin
  config = griffin.get_config('recurrentgemma_2b')
  abstract = nnx.eval_shape(lambda: architectures.create_model(config.model.to_dict(), nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == 2_682_862_080
