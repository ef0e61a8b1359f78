"""experiments/benchmark.py's measurements on CPU: what they report, that its loss curve is the
same on one device and on a sharded mesh (what the multi-GPU scaling runs compare), the decode
benchmark's largest batch under a memory budget, and how bad requests are refused. Speed itself
is measured on the GPU, never asserted here."""
import jax
import numpy as np
import pytest

from experiments.peers import benchmark_decode_peer, benchmark_operator_peer, benchmark_peer
from experiments.plot_decode import throughput_by_context
from tests.helpers import tiny_experiment
from trainers.measure import benchmark_train_step
from trainers.measure_decode import DoesNotFitError, benchmark_decode
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


def test_decode_benchmark_times_the_sampler_at_each_context_and_batch(data_dir):
  config = tiny_experiment(data_dir)
  rows = benchmark_decode(config, [24, 40], [1, 2], new_tokens=4, repeats=1)['results']
  assert [(r['context'], r['batch']) for r in rows] == [(24, 1), (24, 2), (40, 1), (40, 2)]
  assert rows[2]['cache_bytes'] > rows[0]['cache_bytes'] > 0  # full attention: the cache grows with the context
  assert rows[1]['cache_bytes'] == 2 * rows[0]['cache_bytes']
  for row in rows:
    assert row['prefill_s'] > 0 and row['decode_s_per_token'] >= 0 and row['program_bytes'] > row['cache_bytes']
  # The largest batch that fits a budget of 6 batch-1 programs, checked by compiling; past it, a clear refusal.
  budget = 6 * rows[0]['program_bytes']
  largest = benchmark_decode(config, [24], [], new_tokens=4, repeats=1, max_batch=True, memory_limit=budget)
  row = largest['results'][-1]
  assert row['largest_batch'] and row['batch'] > 2 and row['program_bytes'] <= budget
  with pytest.raises(DoesNotFitError, match=rf'batch {4 * row["batch"]} at context 24 needs .* usable'):
    benchmark_decode(config, [24], [4 * row['batch']], new_tokens=4, repeats=1, memory_limit=budget)
  with pytest.raises(ValueError, match='context 5 must exceed the 5 generated tokens'):
    benchmark_decode(config, [5], [1], new_tokens=4)


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
  with pytest.raises(ValueError, match="config.model.name='aaren' has no decode peer"):
    benchmark_decode_peer(config, [64], [1], 8, 1, max_batch=False)


def test_decode_plot_takes_the_largest_batch_found_at_each_context():
  rows = [dict(context=4096, batch=1, decode_tokens_per_s=10.0), dict(context=4096, batch=64, decode_tokens_per_s=500.0),
          dict(context=4096, batch=16, largest_batch=True, decode_tokens_per_s=300.0),
          dict(context=65536, batch=1, decode_tokens_per_s=8.0), dict(context=131072, batch=1)]  # prefill only
  assert throughput_by_context({'results': rows}) == ([4096, 65536], [300.0, 8.0])
