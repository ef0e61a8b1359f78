"""Every config computes what it computed when tests/golden/logits.npz was written.

A refactor of the model code must not change a single function: for each config (tiny, float32,
XLA kernels) every parameter is set from its path alone (N(0, 0.05^2) seeded by the path's
CRC32, layer indices included, so stacked or moved modules get the same numbers whenever the
path is the same), and the logits of two fixed packed rows must equal the stored ones (the first
32 vocabulary entries and the log-sum-exp of every position, to 1e-4). A parameter path that
changed fails here by name. `SEQARCH_WRITE_GOLDEN=1` rewrites the file (only on purpose, in a
commit that says why the numbers changed).
"""
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import architectures
from tests.helpers import CONFIGS, REPO, family_tiny_config, jitted, packed_positions, random_tokens

GOLDEN = os.path.join(REPO, 'tests', 'golden', 'logits.npz')
LENGTH = 48


def path_seeded_params(model) -> list[str]:
  """Sets every parameter of `model` from its path; returns the paths."""
  paths = []
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = '/'.join(map(str, path))
    key = jax.random.key(zlib.crc32(name.encode()))
    variable.set_value(0.05 * jax.random.normal(key, variable.shape, variable.dtype))
    paths.append(name)
  return paths


def golden_logits(name: str, data_dir) -> tuple[list[str], np.ndarray]:
  config = family_tiny_config(name, data_dir)
  model_fields = dict(config.model.to_dict(), attention_impl='xla')
  model = architectures.create_model(model_fields, nnx.Rngs(0))
  paths = path_seeded_params(model)
  tokens = random_tokens((2, LENGTH), 256, seed=7)
  positions = packed_positions([[LENGTH], [17, LENGTH - 17]])
  logits = np.asarray(jitted(model)(tokens, positions)[0], np.float32)
  summary = np.concatenate([logits[..., :32], jax.nn.logsumexp(logits, axis=-1)[..., None]], axis=-1)
  return paths, summary


def write_golden(data_dir) -> None:
  arrays = {}
  for name in CONFIGS:
    paths, summary = golden_logits(name, data_dir)
    arrays[f'{name}/logits'], arrays[f'{name}/paths'] = summary, np.asarray(paths)
  os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
  np.savez_compressed(GOLDEN, **arrays)


@pytest.mark.parametrize('name', CONFIGS)
def test_logits_equal_the_golden_ones(name, data_dir):
  if os.environ.get('SEQARCH_WRITE_GOLDEN') == '1' and name == CONFIGS[0]:
    write_golden(data_dir)
  golden = np.load(GOLDEN)
  assert f'{name}/logits' in golden, f'{name} has no golden logits: SEQARCH_WRITE_GOLDEN=1 (say why in the commit)'
  paths, summary = golden_logits(name, data_dir)
  old_paths = list(golden[f'{name}/paths'])
  assert sorted(paths) == sorted(old_paths), (
      f'{name}: parameter paths changed: new {sorted(set(paths) - set(old_paths))}, '
      f'gone {sorted(set(old_paths) - set(paths))}')
  np.testing.assert_allclose(summary, golden[f'{name}/logits'], atol=1e-4, rtol=1e-4)
