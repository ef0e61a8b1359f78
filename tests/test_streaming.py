"""Long-document streaming: rows continue their own document from step to step,
and the model cache carried between steps makes two segments compute what one
pass over their concatenation computes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainers import data
from trainers.experiment import Experiment
from trainers.training import steps
from trainers.training.train_loop import train
from tests.helpers import (family_tiny_config, jitted, packed_positions, random_tokens, read_metrics, tiny_experiment,
                           tiny_model)


def streaming_config(data_dir, **overrides):
  return tiny_experiment(data_dir, **{'streaming.enabled': True, **overrides})


def test_each_row_continues_its_stream(data_dir):
  config = streaming_config(data_dir)
  iterator = data.make_train_iterator(config)
  batches = [next(iterator) for _ in range(4)]
  for before, after in zip(batches, batches[1:]):
    np.testing.assert_array_equal(after['tokens'][:, 0], before['tokens'][:, -1])  # stride L, one token overlap
    continuing = after['positions'][:, 0] > 0
    np.testing.assert_array_equal(after['positions'][continuing, 0], before['positions'][continuing, -1])
  state = iterator.get_state()
  expected = next(iterator)
  resumed = data.make_train_iterator(config)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['tokens'], expected['tokens'])
  iterator.close(), resumed.close()
  # The rows read different documents (files may share a first line, so look at four segments).
  rows = np.concatenate([b['tokens'] for b in batches], axis=1)
  assert len({row.tobytes() for row in rows}) == config.batch_size


def test_state_of_a_packed_run_is_refused_by_a_streaming_run(data_dir):
  packed = data.make_train_iterator(tiny_experiment(data_dir))
  with pytest.raises(ValueError, match='not a state of this data stream'):
    data.make_train_iterator(streaming_config(data_dir)).set_state(packed.get_state())


@pytest.mark.parametrize('window', [0, 6])
def test_two_segments_with_carried_cache_equal_one_pass(window):
  model = tiny_model(window=window)
  length = 12
  tokens = random_tokens((2, 2 * length), 64)
  positions = packed_positions([[2 * length], [7, 2 * length - 7]])
  call = jitted(model)
  full = call(tokens, positions)[0]
  carry = model.init_cache(2, length, jnp.float32)  # memory = one segment: the whole past is visible
  first, carry = call(tokens[:, :length], positions[:, :length], carry)
  second, _ = call(tokens[:, length:], positions[:, length:], carry)
  np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), full, atol=1e-4)


def test_streaming_step_carries_the_cache_and_shards_it(data_dir):
  config = streaming_config(data_dir, mesh=dict(data=2, fsdp=2, tensor=2), **{'model.dtype': 'float32'})
  exp = Experiment.build(config)
  batch = dict(tokens=np.asarray(random_tokens((8, 33), 257)),
               positions=np.asarray(packed_positions([[33]] * 8)))
  with exp.activate():
    state = exp.new_state()
    keys = state.carry.layers[0].keys  # [B, memory, K, H], split over the batch axes
    assert keys.sharding.spec[0] == ('data', 'fsdp') and keys.addressable_shards[0].data.shape[0] == 2
    step = jax.jit(steps.make_train_step(exp.graphdef, exp.tx, exp.schedule),
                   in_shardings=(exp.state_shardings, exp.batch_sharding), out_shardings=(exp.state_shardings, None))
    state, _ = step(state, exp.device_batch(batch))
  assert int(state.carry.cursor.next_index[0]) == 32
  assert int(jnp.max(state.carry.layers[0].slot_index)) == 31  # the segment's last token is in the memory


def test_streaming_refuses_gradient_accumulation(data_dir):
  with pytest.raises(ValueError, match=r'config\.grad_accum_steps=2: long-document streaming'):
    Experiment.build(streaming_config(data_dir, grad_accum_steps=2, batch_size=16))


@pytest.mark.slow
def test_block_recurrent_stream_resumes_exactly(data_dir, tmp_path):
  """Issue 4's check: a stopped streaming run of the Block-Recurrent Transformer (recurrent state
  and Transformer-XL caches carried across steps) continues with the same loss curve."""
  config = family_tiny_config('block_recurrent', data_dir)
  assert config.streaming.enabled
  config.update(total_steps=8, log_every=1, eval_every=100, checkpoint_every=4)
  train(config, str(tmp_path / 'straight'))
  train(config, str(tmp_path / 'stopped'), stop_at=5)  # off the checkpoint interval
  train(config, str(tmp_path / 'stopped'))
  losses = [[r['loss'] for r in read_metrics(str(tmp_path / run))] for run in ('straight', 'stopped')]
  assert len(losses[0]) == 8 and losses[1] == losses[0]
