"""The comparison command end to end in miniature (two families, a few steps, a second seed), and the
`small` size every config has for it: parameters matched across families, the same training settings."""
import importlib
import json
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

import architectures
from experiments import compare
from tests.helpers import REPO


def parameter_count(config) -> int:
  model = nnx.eval_shape(lambda: architectures.create_model(config.model.to_dict(), nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_every_config_has_a_small_size_matched_to_the_transformers():
  configs = {name: importlib.import_module(f'experiments.configs.{name}').get_config('small') for name in compare.ALL}
  counts = {name: parameter_count(config) for name, config in configs.items()}
  reference = counts['transformer']
  for name, count in counts.items():
    assert 20e6 <= count <= 40e6, (name, count)
    assert abs(count / reference - 1) <= 0.10, (name, count, reference)
  # Every family trains on the same rows, batch and optimizer (no family's settings tuned), and is scored alike.
  shared = lambda c: (c.seq_len, c.batch_size, c.total_steps, c.optimizer.to_dict(), tuple(c.eval_extrapolation),
                      tuple(c.eval_tasks), c.model.dtype)
  for name, config in configs.items():
    assert shared(config) == shared(configs['transformer']), name
  assert configs['transformer'].seq_len == 2048 and configs['transformer'].model.dtype == 'bfloat16'
  assert set(configs['transformer'].eval_tasks) == {'mqar', 'passkey'}
  assert configs['block_recurrent'].model.recurrent_layers == (-3,)
  assert configs['griffin'].model.num_layers % len(configs['griffin'].model.block_pattern) == 0  # whole 'rra' groups


def test_tokens_give_every_family_the_same_training_tokens():
  for name in ('transformer', 'block_recurrent', 'griffin'):
    config = compare.family_config(name, 'small', None, tokens=10 * 32 * 2048 + 5)
    assert config.total_steps == 10 and config.eval_every == 10
    assert config.eval_tasks == ('mqar', 'passkey')
  with pytest.raises(ValueError, match='less than one step'):
    compare.family_config('transformer', 'small', None, tokens=1000)
  with pytest.raises(ValueError, match='--steps and --tokens'):
    compare.family_config('transformer', 'small', 5, tokens=10**9)
  assert compare.family_config('griffin', 'tiny', 3, seed_offset=1).seed == 1
  assert compare.parse_seeds(['transformer:2', 'aaren:1'], ['transformer', 'aaren']) == {'transformer': 2, 'aaren': 1}
  for bad in ('transformer', 'transformer:0', 'griffin:2'):
    with pytest.raises(ValueError, match='--seeds'):
      compare.parse_seeds([bad], ['transformer', 'aaren'])


@pytest.mark.slow  # trains, evaluates and measures two families (one with a second seed) in a subprocess
def test_compare_writes_the_table_and_the_plots(data_dir, tmp_path):
  args = [sys.executable, '-m', 'experiments.compare', '--families=transformer,aaren', '--steps=3',
          '--seeds=transformer:2', '--eval_batches=1', '--contexts=32,64', f'--workdir={tmp_path}', f'--data_dir={data_dir}']
  subprocess.run(args, cwd=REPO, check=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  table = (tmp_path / 'compare.md').read_text()
  assert '| transformer | 0 |' in table and '| transformer | 1 |' in table and '| aaren | 0 |' in table
  assert 'Optimizer settings the same for every family' in table and 'steps of batch 16 x seq_len 128' in table
  assert 'Run-to-run spread' in table and '| transformer | 0, 1 |' in table
  assert '0 of them identical to a training document' in table  # held-out files are not training files
  assert (tmp_path / 'transformer_seed1' / 'checkpoints').is_dir()
  results = json.loads((tmp_path / 'compare.json').read_text())
  by_run = {r['run']: r for r in results}
  assert sorted(by_run) == ['aaren', 'transformer', 'transformer_seed1']
  assert by_run['transformer_seed1']['seed'] == 1 and by_run['transformer_seed1']['decode'] is None
  assert by_run['transformer']['loss'] != by_run['transformer_seed1']['loss']  # another initialisation and data order
  for r in results:
    assert set(r['passkey']['by_length']) == {'128', '256', '512'}  # 1x, 2x, 4x the rows
    assert 0.0 <= r['passkey']['mean'] <= 1.0 and 0.0 <= r['mqar_accuracy'] <= 1.0
  assert by_run['aaren']['cache_bytes']['65536'] == by_run['aaren']['cache_bytes']['1024']  # constant state
  assert by_run['transformer']['cache_bytes']['65536'] == 64 * by_run['transformer']['cache_bytes']['1024'] - 63 * 8  # + cursor
  for name in ('loss', 'loss_by_context', 'cache', 'decode'):
    assert (tmp_path / f'compare_{name}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # The same comparison again reads every run's kept result: nothing trains or evaluates, the table is the same.
  again = subprocess.run(args, cwd=REPO, check=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                         capture_output=True, text=True)
  assert again.stderr.count('read the finished result') == 3 and 'compiling' not in again.stderr
  assert (tmp_path / 'compare.md').read_text() == table


def test_variants_override_a_config_and_bad_ones_are_named():
  variants = compare.parse_variants(['finch_c2=finch:model.time_mix=finch_c2:seq_len=64:model.scan_layers=true'])
  assert variants == {'finch_c2': ('finch', {'model.time_mix': 'finch_c2', 'seq_len': '64',
                                             'model.scan_layers': 'true'})}
  config = compare.family_config('finch_c2', 'tiny', 3, variants=variants)
  assert (config.model.time_mix, config.seq_len, config.model.scan_layers) == ('finch_c2', 64, True)
  assert config.model.name == 'goldfinch' and config.total_steps == 3
  for bad in ('c2=finch', 'c2=nofamily:model.dim=3', 'finch=finch:model.dim=3', '=finch:model.dim=3'):
    with pytest.raises(ValueError, match='--variants'):
      compare.parse_variants([bad])
  with pytest.raises(ValueError, match=r'config\.model\.nope does not exist'):
    compare.family_config('v', 'tiny', 3, variants=compare.parse_variants(['v=finch:model.nope=1']))
