"""GoldFinch and Finch (RWKV-6): prefill (with and without the early exit) + chunked prefill +
single steps == one forward pass on rows with document starts and left padding, the early exit
runs the GOLD layers on 2G + 1 positions only, the cache-size formula of architectures/goldfinch.py
and its ratio to a Transformer of the same shape, scanned layers == looped layers (and start alike),
sharded over 8 devices == one device, FLOPs (attention within the documents), config errors, the
l12_d768 parameter counts. The layers (wkv, token shift, time-mix) are in test_wkv.py; a training
step on the tiny configs is in test_family_contract.py; forecasting in test_timeseries.py."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import architectures
from architectures import goldfinch
from architectures.base import ConfigError
from experiments.configs import common, finch as finch_configs, goldfinch as goldfinch_configs
from experiments.configs import transformer as transformer_configs
from layers.flops import mean_visible_keys
from tests.helpers import packed_positions, random_tokens
from tests.test_gated_retention import random_params
from trainers import partitioning

VOCAB, LENGTH, PROMPT = 64, 22, 9
# 4 layers: 2 Finch-C2 + 2 GOLD (the paper's split); 4 heads of 8; keys compressed 32 -> 8; wkv chunks of 8.
SMALL = dict(name='goldfinch', vocab_size=VOCAB, num_layers=4, dim=32, head_dim=8, mix_lora_rank=4, decay_lora_rank=4,
             gold_lora_rank=4, key_compression=4, wkv_chunk_size=8, dtype='float32', attention_impl='xla')
FINCH = dict(SMALL, num_layers=2, time_mix='finch', gold_layers=0)
_ROW = random_tokens((1, LENGTH), VOCAB, seed=1)[0]
# Row 0: documents start at 4 (in the prompt) and 15 (while decoding); row 1 is left-padded by 3; row 2 holds
# row 1's tokens at the front (padded at the end: it must give the same logits); row 3 starts a document at the
# first decoded token.
TOKENS = jnp.stack([random_tokens((1, LENGTH), VOCAB)[0], _ROW, jnp.roll(_ROW, -3), _ROW[::-1]])
POSITIONS = jnp.concatenate([packed_positions([[4, 11, 7]]), jnp.asarray([[-1] * 3 + list(range(LENGTH - 3))]),
                             packed_positions([[LENGTH - 3]], pad_to=LENGTH), packed_positions([[PROMPT, 13]])])
REAL = np.asarray(POSITIONS) >= 0  # logits at padding mean nothing


def model(**fields):
  return random_params(lambda: architectures.create_model({**SMALL, **fields}, nnx.Rngs(0)))


@nnx.jit(static_argnames='last_only')
def run(m, tokens, positions, cache=None, last_only=False):
  return m(tokens, positions, cache, last_only=last_only)


def assert_close_where_real(actual, expected, real, atol=1e-4):
  np.testing.assert_allclose(np.where(real[..., None], actual, 0), np.where(real[..., None], expected, 0), atol=atol)


def prefill_and_decode(m):
  """Prefill PROMPT tokens with the early exit, then a chunk of 5, then single steps: (logits of the
  prompt's last token and every later one [4, LENGTH - PROMPT + 1, V], the cache after the prompt)."""
  last, cache = run(m, TOKENS[:, :PROMPT], POSITIONS[:, :PROMPT], m.init_cache(4, LENGTH, jnp.float32),
                    last_only=True)
  outs, prompt_cache = [last], cache
  for start, stop in [(PROMPT, PROMPT + 5)] + [(t, t + 1) for t in range(PROMPT + 5, LENGTH)]:
    logits, cache = run(m, TOKENS[:, start:stop], POSITIONS[:, start:stop], cache)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1), prompt_cache


@pytest.mark.parametrize('fields', [{}, FINCH, dict(gold_rope=True, wkv_impl='recurrent')],
                         ids=['goldfinch', 'finch', 'goldfinch-rope-recurrent'])
def test_prefill_with_early_exit_then_chunk_then_steps_equals_forward(fields):
  m = model(**fields)
  full = run(m, TOKENS, POSITIONS)[0]
  decoded, cache = prefill_and_decode(m)
  assert_close_where_real(decoded, full[:, PROMPT - 1:], REAL[:, PROMPT - 1:])
  # Padding changes nothing: the left-padded row gives what the same tokens give at the front of a row.
  np.testing.assert_allclose(full[1, 3:], full[2, :LENGTH - 3], atol=1e-4)
  if not fields:  # the early exit leaves the cache a full prefill leaves
    logits, full_cache = run(m, TOKENS[:, :PROMPT], POSITIONS[:, :PROMPT], m.init_cache(4, LENGTH, jnp.float32))
    assert_close_where_real(logits, full[:, :PROMPT], REAL[:, :PROMPT])
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(full_cache)):
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_early_exit_runs_the_gold_layers_on_the_last_2g_plus_1_positions(monkeypatch):
  """Layer calls are recorded while tracing (nothing is compiled)."""
  m = model()
  seen = []

  def record(self, x, *args, _original=goldfinch.ResidualBlock.__call__):
    seen.append((type(self.mixer).__name__, x.shape[1]))  # RWKV blocks: TimeMix; GOLD blocks: GoldAttention
    return _original(self, x, *args)

  monkeypatch.setattr(goldfinch.ResidualBlock, '__call__', record)
  prompt = (TOKENS[:, :PROMPT], POSITIONS[:, :PROMPT], m.init_cache(4, LENGTH, jnp.float32))
  logits, _ = jax.eval_shape(lambda: m(*prompt, last_only=True))
  assert logits.shape == (4, 1, VOCAB)
  assert seen == [('TimeMix', PROMPT)] * 2 + [('GoldAttention', 5)] * 2  # 2G + 1 = 5 positions
  seen.clear()
  jax.eval_shape(lambda: m(*prompt))
  assert seen == [('TimeMix', PROMPT)] * 2 + [('GoldAttention', PROMPT)] * 2


# --- the cache ---------------------------------------------------------------------------------------

def expected_cache_bytes(cfg: goldfinch.GoldFinchConfig, batch: int, n: int, itemsize: int) -> int:
  """The formula in architectures/goldfinch.py's docstring."""
  shift = 2 * (cfg.dim * itemsize + 4)  # two token shifts: the last input and its document
  rwkv = cfg.num_rwkv_layers * (cfg.num_heads * cfg.head_dim ** 2 * 4 + shift)
  gold = cfg.num_gold_layers * shift
  keys = n * (4 + cfg.dim // cfg.key_compression * itemsize) + 4 if cfg.num_gold_layers else 0
  return batch * (8 + rwkv + gold + keys)


def abstract(model_fields):
  return nnx.eval_shape(lambda: architectures.create_model(model_fields, nnx.Rngs(0)))


def test_cache_bytes_follow_the_formula():
  for fields in (SMALL, FINCH):
    m = abstract(fields)
    cache = m.init_cache(3, LENGTH, jnp.bfloat16)
    assert m.cache_bytes(3, LENGTH) == sum(x.nbytes for x in jax.tree.leaves(cache))
    assert m.cache_bytes(3, LENGTH) == expected_cache_bytes(m.config, 3, LENGTH, 2)
    assert m.cache_bytes(1, 100, jnp.float32) == expected_cache_bytes(m.config, 1, 100, 4)


def test_cache_grows_by_1_plus_d_over_16_numbers_per_token_and_finch_not_at_all():
  gold_cfg, finch_cfg = goldfinch_configs.get_config('l12_d768').model, finch_configs.get_config('l12_d768').model
  gold, finch = abstract(gold_cfg), abstract(finch_cfg)
  d = gold.config.dim
  for n in (4096, 65536):
    assert gold.cache_bytes(1, n) == expected_cache_bytes(gold.config, 1, n, 2)
  # Per token: an int32 token id and c_t of D / 16 = 48 bf16 numbers.
  assert gold.cache_bytes(1, 65537) - gold.cache_bytes(1, 65536) == 4 + d // 16 * 2
  assert finch.cache_bytes(1, 65536) == finch.cache_bytes(1, 4096) == expected_cache_bytes(finch.config, 1, 0, 2)
  # A Transformer of the same shape (D, L, vocabulary; multi-head K/V) keeps L (2 D b + 8) bytes per token.
  reference = transformer_configs.get_config('150m')
  reference.model = common.model_config('transformer', vocab_size=gold_cfg.vocab_size, num_layers=12, dim=d,
                                        num_heads=12, num_kv_heads=12, mlp_dim=2048)
  transformer = abstract(reference.model)
  lines = []
  for n in (4096, 65536):
    t_bytes = transformer.cache_bytes(1, n)
    assert t_bytes == 12 * n * (2 * d * 2 + 8) + 8
    lines.append(f'n={n}: Transformer {t_bytes / 2**20:.1f} MiB, GoldFinch {gold.cache_bytes(1, n) / 2**20:.2f} MiB '
                 f'({t_bytes / gold.cache_bytes(1, n):.1f}x), Finch {finch.cache_bytes(1, n) / 2**20:.2f} MiB '
                 f'({t_bytes / finch.cache_bytes(1, n):.1f}x)')
  per_token = (12 * (2 * d * 2 + 8)) / (4 + d // 16 * 2)
  numbers = 2 * d * 12 / (1 + d / 16)  # docs/architectures.md, GoldFinch: 2 D L / (1 + D / 16)
  print('\nbf16 decode cache per row, L12 D768:\n  ' + '\n  '.join(lines)
        + f'\n  growth per token: {per_token:.1f}x in bytes, {numbers:.1f}x in numbers')
  assert gold.cache_bytes(1, 65536) < transformer.cache_bytes(1, 65536) / 250


# --- scanned layers ----------------------------------------------------------------------------------

def stacked_like_looped(looped, scanned):
  """`scanned` given `looped`'s weights: looped RWKV (GOLD) block i is scanned block i of its stack."""
  state = nnx.to_pure_dict(nnx.state(looped, nnx.Param))
  stack = lambda blocks: jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in sorted(blocks)])
  target = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(target, {**state, 'layers': stack(state['layers']),
                                    'gold_layers': stack(state['gold_layers'])})
  nnx.update(scanned, target)
  return scanned


def test_scanned_layers_equal_looped_layers_start_alike_and_decode():
  """scan_layers: the RWKV blocks and the GOLD blocks are two scanned stacks; with the same weights the
  forward equals the looped one and prefill (early exit) + steps equal it; the layer-dependent initial
  values (lerp and decay profiles, ln_x scales) are those of the looped layers."""
  fields = {**SMALL, 'remat': 'full'}
  looped = model(**fields)
  scanned = stacked_like_looped(looped, model(**fields, scan_layers=True))
  full = run(scanned, TOKENS, POSITIONS)[0]
  np.testing.assert_allclose(full, run(looped, TOKENS, POSITIONS)[0], atol=1e-5)
  decoded, _ = prefill_and_decode(scanned)
  assert_close_where_real(decoded, full[:, PROMPT - 1:], REAL[:, PROMPT - 1:])
  assert scanned.flops_per_token(32) == looped.flops_per_token(32)
  assert scanned.cache_bytes(2, LENGTH) == looped.cache_bytes(2, LENGTH)

  @functools.partial(jax.jit, static_argnums=0)
  def initial(scan: bool):
    return nnx.to_pure_dict(nnx.state(architectures.create_model({**SMALL, 'scan_layers': scan}, nnx.Rngs(0)),
                                      nnx.Param))

  looped, scanned = initial(False), initial(True)
  compared = 0
  for stack in ('layers', 'gold_layers'):
    for i, block in looped[stack].items():
      for path, value in jax.tree_util.tree_flatten_with_path(block)[0]:
        name = jax.tree_util.keystr(path)
        if 'lora' not in name and any(f"['{p}']" in name for p in ('mix', 'mix_x', 'mix_q', 'mix_c', 'mix_k',
                                                                   'mix_v', 'mix_r', 'decay', 'bonus', 'scale')):
          scanned_value = functools.reduce(lambda tree, key: tree[key.key], path, scanned[stack])[i]
          np.testing.assert_array_equal(scanned_value, value, err_msg=f'{stack} {i} {name}')
          compared += 1
  # Per RWKV block: mix_x, mix, decay, ln_x, the channel mix's mix_k and mix_r, the two norms' scales; per GOLD
  # block: mix_x, q, c, k, v, ln_q, ln_k, ln_v, ln_x, mix_k and mix_r, the two norms.
  assert compared == 2 * 8 + 2 * 13


# --- sharding ----------------------------------------------------------------------------------------

def test_sharded_forward_and_decode_equal_one_device():
  """Parameters over fsdp x tensor by their logical names, one row per data x fsdp shard (data=2, fsdp=2,
  tensor=2). The train step (gradients) sharded == one device: tests/test_family_contract.py."""
  def forward_and_decode(m):  # the shapes of the single-device tests above: their compiled functions serve
    last, cache = run(m, TOKENS[:, :PROMPT], POSITIONS[:, :PROMPT], m.init_cache(4, LENGTH, jnp.float32),
                      last_only=True)
    step, _ = run(m, TOKENS[:, PROMPT:PROMPT + 1], POSITIONS[:, PROMPT:PROMPT + 1], cache)
    return run(m, TOKENS, POSITIONS)[0], jnp.concatenate([last, step], axis=1)

  m = model()
  single = forward_and_decode(m)
  mesh = partitioning.make_mesh(dict(data=2, fsdp=2, tensor=2))
  rules = partitioning.rules_table(common.DEFAULT_SHARDING_RULES)
  graphdef, state = nnx.split(m)
  state = jax.device_put(state, partitioning.state_shardings(state, mesh, rules))
  assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    m = nnx.merge(graphdef, state)
    sharded = forward_and_decode(m)
  for a, b in zip(sharded, single):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize('fields', [{}, FINCH], ids=['goldfinch', 'finch'])
def test_flops_are_twice_the_matmul_weights_plus_the_wkv_and_attention(fields):
  m = model(**fields)
  params = nnx.state(m, nnx.Param)
  matmul = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if 'kernel' in jax.tree_util.keystr(path) or 'lora' in jax.tree_util.keystr(path))
  heads, head_dim, dim, seq = 4, 8, 32, 32
  gold = m.config.num_gold_layers  # GoldFinch: 2 Finch-C2 + 2 GOLD layers; Finch: 2 Finch layers
  second_value = 2 * 2 * dim * dim if gold else 0  # Finch-C2 applies W_v twice (v and v2)
  wkv = 2 * (2 * 2 * heads * head_dim * mean_visible_keys(8, 0) + 2 * 2 * heads * head_dim * head_dim)
  attention = gold * 2 * 2 * dim * mean_visible_keys(seq, 0)  # QK and AV
  assert m.flops_per_token(seq) == pytest.approx(2 * matmul + second_value + wkv + attention)
  # Rows of several documents: GOLD attention within each (the wkv's chunks do not change).
  within = gold * 2 * 2 * dim * mean_visible_keys([10, 22, 5, 27], 0)
  assert m.flops_per_token(seq, [10, 22, 5, 27]) == pytest.approx(2 * matmul + second_value + wkv + within)


# --- configs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('fields,message', [
    (dict(head_dim=12), r'config\.model\.head_dim=12: does not divide config\.model\.dim=32'),
    (dict(time_mix='x070'), r"config\.model\.time_mix='x070': known: \('finch', 'finch_c2'\)"),
    (dict(gold_layers=4), r'config\.model\.gold_layers=4: must be in \[-1, config\.model\.num_layers=4\)'),
    (dict(num_layers=1), r'config\.model\.num_layers=1: GoldFinch needs at least one RWKV layer'),
    (dict(key_compression=5), r'config\.model\.key_compression=5: does not divide config\.model\.dim=32'),
    (dict(gold_rope=True, head_dim=3, dim=24), r'config\.model\.head_dim=3: must be even for RoPE'),
    (dict(wkv_impl='pallas'), r"config\.model\.wkv_impl='pallas': known: \('auto', 'chunked', 'fused', 'recurrent'\)"),
    (dict(wkv_impl='fused', wkv_chunk_size=48),
     r"config\.model\.wkv_impl='fused': 'fused' needs config\.model\.head_dim=8 and config\.model\.wkv_chunk_size=48"),
    (dict(wkv_chunk_size=0), r'config\.model\.wkv_chunk_size=0: must be positive'),
    (dict(mlp_dim=-1), r'config\.model\.mlp_dim=-1'),
    (dict(dtype='float8'), r"config\.model\.dtype='float8': not a dtype name"),
    (dict(attention_impl='flash'), r"config\.model\.attention_impl='flash'"),
])
def test_config_errors_name_the_field(fields, message):
  with pytest.raises(ConfigError, match=message):
    architectures.model_config({**SMALL, **fields})


def test_configs_pick_the_split():
  cfg = architectures.model_config(goldfinch_configs.get_config('l12_d768').model)
  assert (cfg.num_rwkv_layers, cfg.num_gold_layers, cfg.time_mix, cfg.num_heads, cfg.hidden_dim) == (
      8, 4, 'finch_c2', 12, 2688)
  cfg = architectures.model_config(finch_configs.get_config('l12_d768').model)
  assert (cfg.num_rwkv_layers, cfg.num_gold_layers, cfg.time_mix) == (12, 0, 'finch')
  cfg = architectures.model_config(goldfinch_configs.get_config('tiny').model)
  assert (cfg.num_rwkv_layers, cfg.num_gold_layers) == (2, 1)
  assert architectures.model_config({**SMALL, 'key_compression': 5, 'gold_layers': 0})  # no GOLD: no keys to compress


def expected_params(cfg: goldfinch.GoldFinchConfig) -> int:
  """Counted from the equations of layers/mixers/rwkv6.py and layers/mixers/gold_attention.py."""
  d, f, v, rm, rd, rk = cfg.dim, cfg.hidden_dim, cfg.vocab_size, cfg.mix_lora_rank, cfg.decay_lora_rank, cfg.kv_rank
  ln = 2 * d
  channel_mix = 2 * d + 2 * d * f + d * d + 2 * ln  # mu_k, mu_r; W_k, W_v; W_r; LN1, LN2 of the block
  # mu_x and 5 mu; 5 mix LoRAs; the decay and its LoRA; W_r, W_k, W_v, W_o; ln_x
  time_mix = 6 * d + 2 * 5 * d * rm + d + 2 * d * rd + 4 * d * d + ln
  if cfg.time_mix == 'finch':
    time_mix += d + d * d                                                 # bonus u, gate
  else:
    time_mix += 2 * d * rd                                                # the second value's LoRA
  gold = 5 * d + 2 * d * rm + 2 * 2 * d * rm + 2 * 2 * d * rk + 2 * d * d + 4 * ln
  c = d // cfg.key_compression
  compression = d * c + (d + c) * d if cfg.num_gold_layers else 0
  return (2 * v * d + 2 * ln + cfg.num_rwkv_layers * (time_mix + channel_mix)
          + cfg.num_gold_layers * (gold + channel_mix) + compression)


def test_l12_d768_parameter_counts():
  counts = {}
  for name, configs in (('goldfinch', goldfinch_configs), ('finch', finch_configs)):
    m = abstract(configs.get_config('l12_d768').model)
    counts[name] = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert counts[name] == expected_params(m.config)
  # GOLD layers have no K/V projections (and Finch-C2 no gate): GoldFinch is 10.3M smaller.
  assert counts == {'goldfinch': 86_538_240, 'finch': 96_881_664}
