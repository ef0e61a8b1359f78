"""Weight decay by parameter role (trainers/training/optimizer.py, layers/param_roles.py).

For every config: each parameter declares a role; AdamW with zero gradients moves exactly the
parameters whose role is decayed (projections, embeddings) and no other; the decayed set is the
same with scan_layers (stacked layers) as without; named parameters of each kind (norms, biases,
RG-LRU a, RWKV decay / bonus / mixes and LoRAs, Aaren's queries, block-recurrent states) are not
decayed and every dense kernel and embedding is.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import architectures
from layers import param_roles
from tests.helpers import CONFIGS, family_tiny_config
from trainers.training.optimizer import decay_mask, make_optimizer

NOT_DECAYED = re.compile(r'(norm|bias|a_param|/decay$|bonus|mix|lora|state_ids|initial_state|query$|scale)')
DECAYED = re.compile(r'(kernel|table)$')


def abstract_params(model_fields: dict) -> nnx.State:
  return nnx.state(nnx.eval_shape(lambda: architectures.create_model(model_fields, nnx.Rngs(0))), nnx.Param)


def masked_paths(params: nnx.State) -> dict[str, bool]:
  """'path/to/param' (layer indices dropped, so stacked and listed layers name alike) -> decayed."""
  flat = jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
  return {re.sub(r'/\d+(?=/)', '', jax.tree_util.keystr(path, simple=True, separator='/')): decayed
          for path, decayed in flat}


@pytest.mark.parametrize('name', CONFIGS)
def test_decay_follows_the_role_and_not_scan_layers(name, data_dir):
  fields = family_tiny_config(name, data_dir, dict(data=1, fsdp=1, tensor=1)).model.to_dict()
  params = abstract_params(fields)
  paths = masked_paths(params)
  for path, decayed in paths.items():
    leaf = path.rsplit('/', 1)[-1]
    if DECAYED.search(leaf) and 'norm' not in path:
      assert decayed, f'{name}: {path} is a projection or embedding but not decayed'
    elif NOT_DECAYED.search(path):
      assert not decayed, f'{name}: {path} is decayed'
    else:
      raise AssertionError(f'{name}: {path}: add its kind to this test')
  family = architectures.get_family(fields['name'])
  if 'scan_layers' in family.Config.unsupported:
    return
  scanned = abstract_params(dict(fields, scan_layers=True))
  assert masked_paths(scanned) == paths
  decayed_size = lambda p: sum(x.size for x, m in zip(jax.tree.leaves(p), jax.tree.leaves(decay_mask(p))) if m)
  assert decayed_size(scanned) == decayed_size(params)


def test_adamw_with_zero_gradients_moves_only_decayed_parameters(data_dir):
  config = family_tiny_config('goldfinch', data_dir, dict(data=1, fsdp=1, tensor=1))
  config.optimizer.update(warmup_steps=0, weight_decay=0.1)
  model = architectures.create_model(config.model.to_dict(), nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  params = jax.tree.map(lambda x: x + 0.5, params)  # LoRA A matrices start at 0: nothing to decay there
  tx, _ = make_optimizer(config)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  for (path, before), after, decayed in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(new),
                                            jax.tree.leaves(decay_mask(params))):
    moved = not np.array_equal(before, after)
    assert moved == decayed, f'{jax.tree_util.keystr(path)}: moved={moved}, decayed={decayed}'


def test_a_parameter_without_a_role_is_refused():
  class Bare(nnx.Module):
    def __init__(self):
      self.kernel = param_roles.param(jnp.ones((2, 2)), param_roles.PROJECTION)
      self.stray = nnx.Param(jnp.ones((2, 2)))

  with pytest.raises(ValueError, match='parameter stray has no role'):
    decay_mask(nnx.state(Bare(), nnx.Param))
  with pytest.raises(ValueError, match="unknown parameter role 'weights'"):
    param_roles.param(jnp.ones(2), 'weights')
