"""Sampling with the decode cache, for every family: greedy decoding equals the
argmax of full forward passes step by step; batched prompts of different
lengths give the tokens each prompt gets alone; the sampling knobs behave."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import FAMILY_CONFIGS, family_tiny_config, jitted, tiny_model
from trainers.experiment import Experiment
from trainers.inference.sampling import generate, sample_logits

PROMPTS = [[72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100], [100, 101, 102], [10, 32, 32, 35, 1, 2, 3, 4]]
NEW = 7


def family_model(name, data_dir):
  exp = Experiment.build(family_tiny_config(name, data_dir, dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  return nnx.merge(exp.graphdef, jax.device_get(exp.new_state().params))


def greedy_by_forward_passes(model, prompt, steps):
  """Each new token is the argmax of a full forward pass over the tokens so far. The passes share one
  jitted width (prompt + steps; the model is causal, so the not yet generated zeros after the last
  token cannot change its logits): one compile instead of each eager op compiling at every length."""
  forward = jitted(model)
  tokens = np.zeros((1, len(prompt) + steps), np.int32)
  tokens[0, :len(prompt)] = prompt
  positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  for t in range(len(prompt), tokens.shape[1]):
    tokens[0, t] = int(jnp.argmax(forward(tokens, positions)[0][0, t - 1]))
  return tokens[0, len(prompt):]


@pytest.mark.parametrize('name', [pytest.param(name, marks=pytest.mark.slow) if name == 'goldfinch' else name
                                  for name in FAMILY_CONFIGS])  # goldfinch: the longest compiles
def test_greedy_equals_forward_argmax_and_batching_changes_nothing(name, data_dir):
  model = family_model(name, data_dir)
  batched = generate(model, PROMPTS, NEW, cache_dtype=jnp.float32)
  for prompt, tokens in zip(PROMPTS, batched):
    alone = generate(model, [prompt], NEW, cache_dtype=jnp.float32)[0]
    np.testing.assert_array_equal(tokens, alone)
  np.testing.assert_array_equal(batched[0], greedy_by_forward_passes(model, PROMPTS[0], NEW))


def test_stops_at_the_end_token():
  model = tiny_model()
  free = generate(model, PROMPTS[:1], NEW, cache_dtype=jnp.float32)[0]
  stopped = generate(model, PROMPTS[:1], NEW, eos_id=int(free[2]), cache_dtype=jnp.float32)[0]
  np.testing.assert_array_equal(stopped, free[:list(free).index(free[2]) + 1])


def test_sampling_knobs():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  draw = lambda **kw: np.asarray(sample_logits(logits, keys, **kw))
  assert set(draw(temperature=1.0, top_k=1, top_p=1.0)) == {0}
  assert set(draw(temperature=1.0, top_k=2, top_p=1.0)) == {0, 1}
  assert set(draw(temperature=1.0, top_k=0, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
  frequencies = np.bincount(draw(temperature=1.0, top_k=0, top_p=1.0), minlength=4) / 2000
  np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.15, 0.05], atol=0.04)
  np.testing.assert_array_equal(draw(temperature=0.0, top_k=0, top_p=1.0), 0)
  with pytest.raises(ValueError, match='temperature >= 0'):
    generate(tiny_model(), PROMPTS, 3, temperature=-1.0)
