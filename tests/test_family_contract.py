"""The contract every family's tiny config keeps (docs/architectures.md, Interface).

Families are found from experiments/configs/*.py, so a new family is covered
as soon as its config file exists. For each config: prefill + single-token
decode == one forward pass (float32, max abs diff < 1e-4) on rows with a
document start or left padding and long enough to wrap window caches, the
prompt written by one cached call or by `prefill` in one call or in chunks; with a soft cap, the
logits before it (`capped=False`, what the loss takes), capped, == the
logits. For each family (the config named after it): the train step on an
8-device mesh (data=2, fsdp=2, tensor=2) == one device (float32; shard
partial sums reduce in another order, so losses agree to rtol 1e-5 and
parameters to 1e-5 after two AdamW steps; Adam's eps is raised to 1e-3 here,
because with the usual 1e-8 an element whose gradient is ~0 turns summation
noise into a sizeable fraction of the learning rate); repeated steps on one
batch lower the loss; cache_bytes matches the cache init_cache builds.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import CONFIGS, FAMILY_CONFIGS, family_tiny_config, jitted, packed_positions, random_tokens
from trainers.experiment import Experiment
from trainers.training import steps

DECODE_LENGTH, PROMPT = 40, 13


def tiny_config(name: str, data_dir, mesh: dict):
  config = family_tiny_config(name, data_dir, mesh)
  config.optimizer.update(warmup_steps=0, learning_rate=3e-3, eps=1e-3)
  return config


def prefill_call(model, chunk: int):
  """model.prefill(tokens, positions, a new float32 cache of DECODE_LENGTH, chunk), jitted."""
  graphdef, state = nnx.split(model)

  def prefill(state, tokens, positions):
    model = nnx.merge(graphdef, state)
    return model.prefill(tokens, positions, model.init_cache(tokens.shape[0], DECODE_LENGTH, jnp.float32), chunk)

  return functools.partial(jax.jit(prefill), state)


@pytest.mark.parametrize('name', CONFIGS)
def test_prefill_then_decode_equals_forward(name, data_dir):
  """One cached call over the prompt, and `prefill` in one call and in chunks of 5 (a remainder of 3
  first; chunk borders inside documents and inside the left padding), then single-token steps."""
  exp = Experiment.build(tiny_config(name, data_dir, dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  model = nnx.merge(exp.graphdef, jax.device_get(exp.new_state().params))
  tokens = random_tokens((3, DECODE_LENGTH), 256)
  left_padded = jnp.concatenate([jnp.full((1, 4), -1, jnp.int32), packed_positions([[DECODE_LENGTH - 4]])], axis=1)
  positions = jnp.concatenate([packed_positions([[5, DECODE_LENGTH - 5], [DECODE_LENGTH]]), left_padded])
  call = jitted(model)
  full = call(tokens, positions)[0]
  real = np.asarray(positions >= 0)[..., None]  # padding's logits are never used
  cache = model.init_cache(3, DECODE_LENGTH, jnp.float32)
  logits, cache = call(tokens[:, :PROMPT], positions[:, :PROMPT], cache)
  outs = [logits]
  for chunk in (0, 5):
    last, chunked_cache = prefill_call(model, chunk)(tokens[:, :PROMPT], positions[:, :PROMPT])
    np.testing.assert_allclose(last[:, 0], full[:, PROMPT - 1], atol=1e-4, err_msg=f'prefill chunk {chunk}')
  for t in range(PROMPT, DECODE_LENGTH):
    logits, cache = call(tokens[:, t:t + 1], positions[:, t:t + 1], cache)
    chunked_logits, chunked_cache = call(tokens[:, t:t + 1], positions[:, t:t + 1], chunked_cache)
    np.testing.assert_allclose(chunked_logits, full[:, t:t + 1], atol=1e-4, err_msg=f'after chunked prefill, {t}')
    outs.append(logits)
  np.testing.assert_allclose(np.where(real, jnp.concatenate(outs, axis=1), 0), np.where(real, full, 0), atol=1e-4)
  if cap := model.logits_soft_cap:
    before_cap = jitted(model, capped=False)(tokens, positions)[0]
    np.testing.assert_allclose(cap * jnp.tanh(before_cap / cap), full, rtol=1e-6, atol=1e-6)
  assert model.cache_bytes(3, DECODE_LENGTH, jnp.float32) == sum(x.nbytes for x in jax.tree.leaves(cache))


def train_steps(config, devices, num_steps, params_after=2):
  """The parameters after `params_after` steps and the losses of `num_steps` steps on one batch."""
  exp = Experiment.build(config, devices)
  batch = dict(tokens=np.asarray(random_tokens((8, 33), 256)),
               positions=np.asarray(packed_positions([[33], [10, 23], [33], [5, 28]] * 2)))
  with exp.activate():
    state = exp.new_state()
    step = jax.jit(steps.make_train_step(exp.graphdef, exp.tx, exp.schedule),
                   in_shardings=(exp.state_shardings, exp.batch_sharding), out_shardings=(exp.state_shardings, None))
    losses = []
    for i in range(num_steps):
      state, metrics = step(state, exp.device_batch(batch))
      losses.append(float(metrics['loss']))
      if i + 1 == params_after:
        params = jax.device_get(state.params)
  return params, losses


@pytest.mark.parametrize('name', FAMILY_CONFIGS)
def test_sharded_step_equals_one_device_and_lowers_the_loss(name, data_dir):
  single, single_losses = train_steps(tiny_config(name, data_dir, dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1], 2)
  sharded, sharded_losses = train_steps(tiny_config(name, data_dir, dict(data=2, fsdp=2, tensor=2)), jax.devices(), 6)
  np.testing.assert_allclose(sharded_losses[:2], single_losses, rtol=1e-5)
  assert sharded_losses[-1] < sharded_losses[0] - 0.5
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
