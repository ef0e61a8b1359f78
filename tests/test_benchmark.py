"""experiments/benchmark.py's measurements on CPU: what they report, that its loss curve is the
same on one device and on a sharded mesh (what the multi-GPU scaling runs compare), and how bad
requests are refused. Speed itself is measured on the GPU, never asserted here."""
import jax
import numpy as np
import pytest

from experiments.peers import benchmark_operator_peer, benchmark_peer
from tests.helpers import tiny_experiment
from trainers.measure import benchmark_decode, benchmark_train_step
from trainers.measure_ops import benchmark_operator


def test_train_benchmark_loss_curve_is_the_same_on_one_device_and_sharded(data_dir):
  float32 = {'model.dtype': 'float32'}  # bf16 sums reduced in another order differ by ~1e-4
  one = benchmark_train_step(tiny_experiment(data_dir, **float32), num_steps=2, warmup=2, devices=jax.devices()[:1])
  two = benchmark_train_step(tiny_experiment(data_dir, **float32, **{'mesh.fsdp': 2}), num_steps=2, warmup=2,
                             devices=jax.devices()[:2])
  assert (one['devices'], two['devices']) == (1, 2) and len(one['losses']) == 4
  assert one['losses'][-1] < one['losses'][0]  # the same batch every step: AdamW lowers its loss
  np.testing.assert_allclose(two['losses'], one['losses'], rtol=1e-5)
  assert two['tokens_per_s_per_device'] == pytest.approx(two['tokens_per_s'] / 2)
  assert one['tokens_per_s'] == pytest.approx(one['batch_size'] * one['seq_len'] / one['step_s'])


def test_decode_benchmark_reports_each_context(data_dir):
  result = benchmark_decode(tiny_experiment(data_dir), [8, 24], batch=1, num_tokens=2)
  small, large = result['contexts']
  assert (small['context'], large['context']) == (8, 24)
  assert large['cache_bytes'] > small['cache_bytes'] > 0  # full attention: the cache grows with the context
  assert small['decode_s_per_token'] > 0 and small['prefill_s'] > 0


@pytest.mark.parametrize('name', ['wkv', 'wkv_chunked', 'gated_retention', 'attention', 'rg_lru', 'rg_lru_xla'])
def test_operator_benchmark_times_forward_and_backward(name):
  result = benchmark_operator(name, batch=1, seq_len=32, heads=2, head_dim=8, num_steps=1)
  assert result['operator'] == name and result['fwd_bwd_s'] > 0


def test_bad_requests_name_the_problem(data_dir):
  with pytest.raises(ValueError, match="unknown operator 'mamba'"):
    benchmark_operator('mamba', 1, 32, 2, 8, 1)
  with pytest.raises(ValueError, match="operator 'gated_retention' has no peer"):
    benchmark_operator_peer('gated_retention', 1, 32, 2, 8, 1)
  config = tiny_experiment(data_dir)
  config.model.name = 'aaren'
  with pytest.raises(ValueError, match="config.model.name='aaren' has no peer"):
    benchmark_peer(config, 1, 1)
