"""Time-series forecasting: the generated Mackey-Glass data, and every family
trained on it through the same trainer (its values in and predictions out
through the shared SeriesIO), with MSE/MAE from the evaluator and the cached
form equal to the parallel one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import FAMILY_CONFIGS, family_tiny_config, jitted, packed_positions
from trainers import data
from trainers.checkpoints import read_checkpoint
from trainers.data.timeseries import LENGTH, TRAIN_FRACTION, mackey_glass
from trainers.experiment import Experiment
from trainers.training.evaluator import evaluate_checkpoint
from trainers.training.train_loop import train


def forecast_config(name, data_dir, **overrides):
  config = family_tiny_config(name, data_dir)
  config.dataset.update(name='mackey_glass', features=2)
  config.model.input_features = 2
  config.update(total_steps=30, log_every=10, eval_every=1000, checkpoint_every=1000, eval_batches=2,
                eval_extrapolation=(2,), eval_tasks=(), **overrides)
  config.optimizer.update(learning_rate=3e-3, warmup_steps=5)
  return config


def test_mackey_glass_is_reproducible_standardised_and_split(data_dir):
  series = mackey_glass(2)
  assert series.shape == (LENGTH, 2) and np.array_equal(series, mackey_glass.__wrapped__(2))
  train_part = series[:int(LENGTH * TRAIN_FRACTION)]
  np.testing.assert_allclose(train_part.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(train_part.std(0), 1, atol=1e-5)
  assert not np.allclose(series[:, 0], series[:, 1])  # channels use different delays
  config = forecast_config('transformer', data_dir)
  first, second = list(data.make_eval_batches(config, num_batches=2))
  np.testing.assert_array_equal(first['values'][1, 0], first['values'][0, -1])  # consecutive windows
  np.testing.assert_array_equal(first['values'][0], series[int(LENGTH * TRAIN_FRACTION):][:33])


def errors_by_hand(config, workdir, num_batches: int) -> tuple[float, float]:
  """MSE and MAE of the checkpoint's next-step predictions over the validation windows, computed here in
  numpy (targets: values[:, 1:] wherever the target's position is > 0), not by the evaluator."""
  exp = Experiment.build(config)
  _, state, _ = read_checkpoint(workdir, exp.restore_target())
  model = nnx.merge(exp.graphdef, jax.device_get(state.params))
  forward, squared, absolute, count = jitted(model), 0.0, 0.0, 0
  for batch in data.make_eval_batches(config, num_batches=num_batches):
    values, positions = np.asarray(batch['values'], np.float32), np.asarray(batch['positions'])
    predictions = np.asarray(forward(jnp.asarray(values[:, :-1]), jnp.asarray(positions[:, :-1]))[0])
    counted = positions[:, 1:] > 0
    error = (predictions - values[:, 1:])[counted]  # [targets, F]
    squared += float(np.sum(np.mean(error ** 2, axis=-1)))
    absolute += float(np.sum(np.mean(np.abs(error), axis=-1)))
    count += int(counted.sum())
  return squared / count, absolute / count


@pytest.mark.parametrize('name', FAMILY_CONFIGS)
def test_family_forecasts_and_reports_mse_mae(name, data_dir, tmp_path):
  config = forecast_config(name, data_dir)
  last = train(config, str(tmp_path))
  results = evaluate_checkpoint(config, str(tmp_path), num_batches=4)
  mse, mae = errors_by_hand(config, str(tmp_path), num_batches=4)
  assert results['mse'] == pytest.approx(mse, rel=1e-4) and results['mae'] == pytest.approx(mae, rel=1e-4)
  assert results['mse'] < 0.5  # a standardised series has MSE 2 under "predict a random past value"
  assert last['loss'] < 0.5 and 'bits_per_byte' not in results and '2x' in results['extrapolation']


@pytest.mark.parametrize('name', FAMILY_CONFIGS)
def test_cached_forecast_equals_one_pass(name, data_dir):
  exp = Experiment.build(forecast_config(name, data_dir, mesh=dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  model = nnx.merge(exp.graphdef, jax.device_get(exp.new_state().params))
  values = jnp.asarray(np.random.default_rng(0).normal(size=(2, 20, 2)), jnp.float32)
  positions = packed_positions([[8, 12], [20]])
  call = jitted(model)
  full = call(values, positions)[0]
  cache = model.init_cache(2, 20, jnp.float32)
  head, cache = call(values[:, :11], positions[:, :11], cache)
  outs = [head]
  for t in range(11, 20):
    out, cache = call(values[:, t:t + 1], positions[:, t:t + 1], cache)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-4)


def test_features_must_match_the_series(data_dir):
  config = forecast_config('transformer', data_dir)
  config.model.input_features = 3
  with pytest.raises(ValueError, match=r'config\.model\.input_features=3: .* config\.dataset\.features=2'):
    Experiment.build(config)
