"""Hybrids (architectures/hybrid.py): random patterns of every mixer decode as they run in parallel, the
presets that are patterns compute the same logits from the same weights, scanned groups equal looped ones,
the cache is the sum of its mixers', and a wrong pattern or block is one line naming it, before compiling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import architectures
from architectures.base import ConfigError
from architectures.hybrid import parse_layers, shortest_period
from experiments.configs import hybrid as hybrid_configs
from tests.helpers import family_tiny_config, packed_positions, random_tokens
from tests.test_cache_bytes import hybrid_bytes
from tests.test_gated_retention import random_params
from trainers.experiment import Experiment
from trainers.run_config import WorkdirMismatchError, record_or_check

VOCAB, LENGTH, PROMPT, DIM = 64, 16, 7, 32
TOKENS = random_tokens((2, LENGTH), VOCAB)
POSITIONS = packed_positions([[5, LENGTH - 5], [LENGTH]])  # row 0: a document starts at index 5, in the prompt
# Tiny blocks: windows (5, 4) shorter than the rows, so rings wrap; chunks of 4, so rows span several.
BLOCKS = dict(
    attention=dict(num_heads=4, num_kv_heads=2), local_attention=dict(num_heads=4, window=5),
    rg_lru=dict(width=48, num_heads=4, chunk_size=4), gated_retention=dict(num_heads=2, chunk_size=4),
    wkv6=dict(head_dim=8, mix_lora_rank=4, decay_lora_rank=4, chunk_size=4), aaren=dict(num_heads=2, chunk_size=4),
    block_recurrent=dict(num_heads=2, num_kv_heads=1, window=4, num_states=3),
    cross_attention=dict(num_heads=4, num_kv_heads=2), gold=dict(head_dim=8, key_compression=4, mix_lora_rank=4,
                                                                 lora_rank=4))
WRITERS = ('attention', 'local_attention', 'rg_lru', 'gated_retention', 'wkv6', 'aaren', 'windowed_attention',
           'block_recurrent')


def fields(layers: str, **extra) -> dict:
  return {'name': 'hybrid', 'vocab_size': VOCAB, 'dim': DIM, 'mlp_dim': 48, 'layers': layers, 'dtype': 'float32',
          'attention_impl': 'xla', **BLOCKS, **extra}


def hybrid(layers: str, **extra):
  """A float32 hybrid of `layers` with random weights (built abstractly: no initialiser compiles)."""
  return random_params(lambda: architectures.create_model(fields(layers, **extra), nnx.Rngs(0)))


CALL = jax.jit(lambda graphdef, state, *args: nnx.merge(graphdef, state)(*args), static_argnums=0)
PREFILL = jax.jit(lambda graphdef, state, tokens, positions, cache: nnx.merge(graphdef, state).prefill(
    tokens, positions, cache), static_argnums=0)


def forward(model) -> jax.Array:
  return CALL(*nnx.split(model), TOKENS, POSITIONS)[0]


def prefill_and_decode(model) -> jax.Array:
  """`prefill` (the readers' early exit) over the prompt, then one token at a time: logits from PROMPT - 1 on."""
  graphdef, state = nnx.split(model)
  last, cache = PREFILL(graphdef, state, TOKENS[:, :PROMPT], POSITIONS[:, :PROMPT],
                        model.init_cache(2, LENGTH, jnp.float32))
  outs = [last]
  for t in range(PROMPT, LENGTH):
    logits, cache = CALL(graphdef, state, TOKENS[:, t:t + 1], POSITIONS[:, t:t + 1], cache)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


def random_patterns() -> list[tuple[str, dict]]:
  """Every writer mixer once, shuffled (seed 0) into three patterns of a group of two repeated and a third; the
  first read by two cross-attention layers, the second by two GOLD layers (with RWKV's channel mix), the third
  by none."""
  order = np.random.default_rng(0).permutation(len(WRITERS + ('attention',)))
  mixers = [(WRITERS + ('attention',))[i] for i in order]
  readers = [(',cross_attention*2', {}), (',gold*2', dict(mlp='channel_mix', norm='layer', embed_norm=True)), ('', {})]
  return [(f'({mixers[3 * i]},{mixers[3 * i + 1]})*2,{mixers[3 * i + 2]}{tail}', extra)
          for i, (tail, extra) in enumerate(readers)]


@pytest.mark.parametrize('layers,extra', random_patterns(), ids=[p for p, _ in random_patterns()])
def test_random_pattern_prefill_then_decode_equals_forward(layers, extra):
  model = hybrid(layers, **extra)
  full = forward(model)
  np.testing.assert_allclose(prefill_and_decode(model), full[:, PROMPT - 1:], atol=1e-4)
  for b, dtype in ((4, jnp.float32), (2, jnp.bfloat16)):
    assert model.cache_bytes(2, LENGTH, dtype) == 2 * hybrid_bytes(fields(layers, **extra), LENGTH, b)


# --- the presets as patterns ---------------------------------------------------------------------------

def griffin_paths(kinds: tuple[str, ...], prefix: str = '') -> list[tuple]:
  """Where each layer of a pattern sits in a hybrid (and a Griffin): groups of the shortest period of the writers,
  the tail, the readers."""
  writers = [kind for kind in kinds if kind not in ('cross_attention', 'gold')]
  period = len(shortest_period(tuple(writers)))
  whole = len(writers) // period * period
  places = [('groups', i // period, 'blocks', i % period) if i < whole else ('tail', 0, 'blocks', i - whole)
            for i in range(len(writers))]
  return places + [('readers', i) for i in range(len(kinds) - len(writers))]


def stacks(*sizes: tuple[str, int]) -> list[tuple]:
  """A preset's layer places: each of its stacks (name, depth), in order."""
  return [(name, i) for name, depth in sizes for i in range(depth)]


SHARED = dict(vocab_size=VOCAB, dim=DIM, dtype='float32', attention_impl='xla')
GRIFFIN = dict(SHARED, name='griffin', num_layers=4, num_heads=4, lru_width=48, mlp_dim=96, window=5,
               lru_chunk_size=4)
GRIFFIN_AS_HYBRID = dict(norm='rms_zero_centered', mlp='geglu', mlp_bias=True, mlp_dim=96, scale_embeddings=True,
                         round_embed_scale=True, tie_embeddings=True, logits_soft_cap=30.0)
YOCO = dict(SHARED, name='yoco', num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=48, retention_chunk_size=4)
YOCO_AS_HYBRID = dict(norm_eps=1e-5, scale_embeddings=True, gated_retention=dict(num_heads=4, chunk_size=4))
GOLDFINCH = dict(SHARED, name='goldfinch', num_layers=4, head_dim=8, mlp_dim=48, mix_lora_rank=4, decay_lora_rank=4,
                 gold_lora_rank=4, key_compression=4, wkv_chunk_size=4)
RWKV_AS_HYBRID = dict(mlp='channel_mix', norm='layer', norm_eps=1e-5, embed_norm=True)
WKV = dict(head_dim=8, mix_lora_rank=4, decay_lora_rank=4, chunk_size=4)
TRANSFORMER = dict(SHARED, name='transformer', num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48)
BRT = dict(SHARED, name='block_recurrent', num_layers=3, num_heads=2, num_kv_heads=1, mlp_dim=48, window=4,
           num_states=3, recurrent_layers=(1,))
PRESETS = {  # name: (preset fields, the pattern, the hybrid's other fields, the preset's layer places)
    'transformer': (TRANSFORMER, 'attention*2', {}, stacks(('layers', 2))),
    'aaren': (dict(TRANSFORMER, name='aaren', num_kv_heads=0, chunk_size=4), 'aaren*2',
              dict(aaren=dict(num_heads=4, chunk_size=4)), stacks(('layers', 2))),
    'griffin': (GRIFFIN, 'rg_lru,rg_lru,local_attention,rg_lru', GRIFFIN_AS_HYBRID, None),
    'hawk': (dict(GRIFFIN, num_layers=2, block_pattern='r'), 'rg_lru*2', GRIFFIN_AS_HYBRID, None),
    'yoco': (YOCO, 'gated_retention*2,cross_attention*2', YOCO_AS_HYBRID,
             stacks(('self_layers', 2), ('cross_layers', 2))),
    'yoco_swa': (dict(YOCO, num_layers=3, self_mixer='sliding_window', self_num_kv_heads=2, window=5),
                 'local_attention,cross_attention*2',
                 dict(YOCO_AS_HYBRID, local_attention=dict(num_heads=4, num_kv_heads=2, window=5, rope_fraction=1.0,
                                                           rope_style='interleaved', rope_frequencies='linspace',
                                                           out_bias=False)),
                 stacks(('self_layers', 1), ('cross_layers', 2))),
    'goldfinch': (GOLDFINCH, 'wkv6*2,gold*2', dict(RWKV_AS_HYBRID, wkv6=dict(WKV, variant='finch_c2')),
                  stacks(('layers', 2), ('gold_layers', 2))),
    'finch': (dict(GOLDFINCH, num_layers=2, gold_layers=0, time_mix='finch'), 'wkv6*2',
              dict(RWKV_AS_HYBRID, wkv6=WKV), stacks(('layers', 2))),
    'block_recurrent': (BRT, 'windowed_attention,block_recurrent,windowed_attention',
                        dict(block_recurrent=dict(num_heads=2, num_kv_heads=1, window=4, num_states=3)),
                        stacks(('layers', 3))),
}


def move(path: tuple, places: dict[tuple, tuple]) -> tuple:
  """A preset's parameter path with its layer's place replaced by the hybrid's."""
  for size in (2, 4):
    if path[:size] in places:
      return places[path[:size]] + path[size:]
  return path


@pytest.mark.parametrize('name', PRESETS)
def test_preset_expressed_as_a_pattern_gives_the_same_logits(name):
  """Every preset is a pattern: Transformer ('attention*L'), Aaren, Griffin, Hawk, YOCO (gated retention or
  sliding-window self-decoder), GoldFinch, Finch and the Block-Recurrent Transformer. The preset's weights are
  copied to the hybrid's paths (its layers' places mapped to the hybrid's; every other path is the same) and the
  logits compared, with every parameter of each model set."""
  preset_fields, layers, extra, places = PRESETS[name]
  preset = random_params(lambda: architectures.create_model(preset_fields, nnx.Rngs(0)))
  model = hybrid(layers, **{**extra, 'mlp_dim': preset_fields['mlp_dim']})
  hybrid_places = griffin_paths(parse_layers(layers))
  places = dict(zip(places or hybrid_places, hybrid_places))
  source = nnx.to_flat_state(nnx.state(preset, nnx.Param))
  target = nnx.state(model, nnx.Param)
  moved = {move(path, places): variable for path, variable in source}
  assert sorted(moved) == sorted(path for path, _ in nnx.to_flat_state(target))
  nnx.replace_by_pure_dict(target, nnx.to_pure_dict(nnx.from_flat_state(moved)))
  nnx.update(model, target)
  np.testing.assert_allclose(forward(model), forward(preset), atol=1e-5)


# --- scanned groups -------------------------------------------------------------------------------------

def test_scanned_groups_equal_looped_ones_and_decode():
  """'(rg_lru,wkv6)*2,rg_lru,gold*2': two groups of the period (rg_lru, wkv6) scanned, a tail, two GOLD layers
  scanned; given the looped model's weights, the same logits, and prefill + steps equal them."""
  layers, extra = '(rg_lru,wkv6)*2,rg_lru,gold*2', dict(mlp='channel_mix', embed_norm=True)
  looped, scanned = hybrid(layers, **extra), hybrid(layers, **extra, scan_layers=True)
  state = nnx.to_pure_dict(nnx.state(looped, nnx.Param))
  stacked = lambda blocks: jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in sorted(blocks)])
  target = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(target, {**state, 'groups': stacked(state['groups']), 'readers': stacked(state['readers'])})
  nnx.update(scanned, target)
  full = forward(scanned)
  np.testing.assert_allclose(full, forward(looped), atol=1e-5)
  np.testing.assert_allclose(prefill_and_decode(scanned), full[:, PROMPT - 1:], atol=1e-4)
  assert scanned.flops_per_token(LENGTH) == looped.flops_per_token(LENGTH)
  assert scanned.reader_window() == 1 + 2 * 2  # each GOLD block's two token shifts


# --- the grammar and the errors ---------------------------------------------------------------------------

def test_pattern_grammar_and_groups():
  assert parse_layers(' (rg_lru * 2, local_attention)*2 ,gold') == (
      'rg_lru', 'rg_lru', 'local_attention', 'rg_lru', 'rg_lru', 'local_attention', 'gold')
  assert parse_layers('((a,b)*2,c)*2') == ('a', 'b', 'a', 'b', 'c') * 2
  assert shortest_period(('r', 'r', 'a') * 4) == ('r', 'r', 'a')
  assert shortest_period(('r', 'r', 'a', 'r')) == ('r', 'r', 'a')  # one group, then a tail
  model = nnx.eval_shape(lambda: architectures.create_model(fields('(rg_lru*2,local_attention)*4,rg_lru'),
                                                            nnx.Rngs(0)))
  assert (len(model.groups), len(model.tail), len(model.readers)) == (4, 1, 0)
  assert architectures.model_config(fields('wkv6*5,gold*3')).num_layers == 8
  config = hybrid_configs.get_config('tiny')
  config.model.layers = 'gated_retention*3,cross_attention*3'  # the config file leaves num_layers to the pattern
  assert architectures.model_config(config.model.to_dict()).num_layers == 6


LAYERS = r"config\.model\.layers="


@pytest.mark.parametrize('layers,extra,message', [
    ('rg_lru,mamba', {}, LAYERS + r"'rg_lru,mamba': unknown mixer 'mamba'; known: \['aaren', 'attention', "),
    ('(rg_lru,attention', {}, LAYERS + r"'\(rg_lru,attention': a '\(' is not closed; a pattern is comma-separated "),
    ('rg_lru*0', {}, LAYERS + r"'rg_lru\*0': '\*' must be followed by a count >= 1, not '0'"),
    ('rg_lru,,attention', {}, LAYERS + r"'rg_lru,,attention': expected a mixer name or a group at ','"),
    ('cross_attention*2', {}, LAYERS + r"'cross_attention\*2': cross_attention reads the shared keys of the layers "
     'before it, and there are none'),
    ('gated_retention,cross_attention,rg_lru', {}, LAYERS + r"'gated_retention,cross_attention,rg_lru': rg_lru "
     r'\(layer 2\) follows cross_attention \(layer 1\): the layers that read shared keys \(cross_attention, gold\) '
     'come last'),
    ('rg_lru,cross_attention,gold', {}, r'cross_attention and gold read different shared-keys stages'),
    ('attention', dict(attention=dict(num_heads=3)), r"config\.model\.attention\.num_heads=3: does not divide "
     r"config\.model\.dim=32 \(a mixer of config\.model\.layers='attention'\)"),
    ('attention', dict(attention=dict(num_kv_heads=3)), r'attention\.num_kv_heads=3: must divide '
     r'config\.model\.attention\.num_heads=4'),
    ('rg_lru', dict(rg_lru=dict(width=48, num_heads=5)), r'rg_lru\.num_heads=5: does not divide the width=48'),
    ('wkv6', dict(wkv6=dict(head_dim=12)), r'config\.model\.wkv6\.head_dim=12: does not divide config\.model\.dim=32'),
    ('rg_lru,gold', dict(gold=dict(BLOCKS['gold'], key_compression=5)), r'gold\.key_compression=5: does not '),
    ('rg_lru,cross_attention', dict(cross_attention=dict(num_kv_heads=3)), r'cross_attention\.num_kv_heads=3: '),
    ('local_attention', dict(local_attention=dict(window=0)), r'local_attention\.window=0: must be positive'),
    ('attention', dict(attention=dict(heads=4)), r"config\.model\.attention has unknown keys \['heads'\]; known: "),
    ('attention', dict(attention=dict(window='8')), r"config\.model\.attention\.window='8': must be of type int"),
    ('attention*2', dict(num_layers=3), r'config\.model\.num_layers=3: must be 0 or the 2 layers of '),
    ('attention', dict(mlp='relu'), r"config\.model\.mlp='relu': known: \('swiglu', 'geglu', 'channel_mix'\)"),
])
def test_a_wrong_pattern_or_block_is_one_line_naming_it(layers, extra, message):
  with pytest.raises(ConfigError, match=message) as error:
    architectures.model_config({**fields(layers), **extra})
  assert '\n' not in str(error.value)


def test_a_wrong_pattern_is_refused_before_compiling(data_dir, monkeypatch):
  config = family_tiny_config('hybrid', data_dir)
  config.model.layers = 'cross_attention,rg_lru'
  compiled = []
  monkeypatch.setattr(jax, 'jit', lambda *a, **k: compiled.append(a))
  with pytest.raises(ValueError, match=LAYERS + r"'cross_attention,rg_lru': cross_attention reads"):
    Experiment.build(config)
  assert not compiled


def test_a_run_resumes_with_another_kernel_but_not_another_block(tmp_path):
  """The recorded config (trainers/run_config.py) is compared key by key inside the blocks: a runtime key
  (rg_lru.impl) may differ, any other is named."""
  config = hybrid_configs.get_config('tiny')
  record_or_check(config, tmp_path)
  config.model.rg_lru.impl = 'sequential'
  record_or_check(config, tmp_path)
  config.model.local_attention.window = 32
  with pytest.raises(WorkdirMismatchError, match=r'config\.model\.local_attention\.window: 16 in the workdir, 32 now'):
    record_or_check(config, tmp_path)
