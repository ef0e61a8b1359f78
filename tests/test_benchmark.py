"""experiments/benchmark.py's measurements on CPU: what they report, that its loss curve is the
same on one device and on a sharded mesh (what the multi-GPU scaling runs compare), its rows of
`docs_per_row` documents and the FLOPs its two MFUs count, the decode benchmark's largest batch
under a memory budget, and how bad requests are refused. Speed itself is measured on the GPU,
never asserted here."""
import os
import statistics
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import peers
from experiments.peers import benchmark_decode_peer, benchmark_operator_peer, benchmark_peer, peer_docs_per_row
from experiments.plot_decode import throughput_by_context
from layers.mixers.gated_retention_ops import recurrent_retention
from layers.mixers.rg_lru import rg_lru
from layers.mixers.wkv import wkv
from tests.helpers import REPO, packed_positions, tiny_experiment, tiny_model
from trainers.measurement.decode_speed import DoesNotFitError, benchmark_decode
from trainers.measurement.op_speed import OPERATORS, benchmark_operator, packed_documents
from trainers.measurement.train_speed import benchmark_train_step, document_lengths, synthetic_batch, train_flops_per_token
from trainers.training.steps import split_batch


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
  # Rows of 4 documents by default: the work done is less than MaxText's full causal attention a row.
  assert one['docs_per_row'] == 4 and one['train_flops_per_token'] < one['train_flops_per_token_maxtext']
  assert one['mfu'] is None and one['mfu_maxtext'] is None  # a CPU has no known peak


@pytest.mark.parametrize('docs_per_row', [1, 2, 4, 32])
def test_synthetic_rows_hold_docs_per_row_documents_and_repeat_with_the_seed(docs_per_row):
  batch = synthetic_batch(8, 32, seed=3, docs_per_row=docs_per_row)
  assert batch['tokens'].shape == batch['positions'].shape == (8, 33)
  lengths = document_lengths(split_batch(batch)[1])  # the documents the model sees, in row order
  assert len(lengths) == 8 * docs_per_row and lengths.min() >= 1
  np.testing.assert_array_equal(lengths.reshape(8, docs_per_row).sum(axis=1), 32)
  np.testing.assert_array_equal((batch['positions'] == 0).sum(axis=1), docs_per_row)  # no start on the last target
  if docs_per_row == 1:
    np.testing.assert_array_equal(batch['positions'], np.tile(np.arange(33), (8, 1)))
  if docs_per_row == 4:  # random lengths: the rows differ
    assert len({tuple(row) for row in lengths.reshape(8, 4)}) > 1
  again = synthetic_batch(8, 32, seed=3, docs_per_row=docs_per_row)
  for key in ('tokens', 'positions'):
    np.testing.assert_array_equal(again[key], batch[key])
  assert not np.array_equal(synthetic_batch(8, 32, seed=4, docs_per_row=docs_per_row)['tokens'], batch['tokens'])
  for bad in (0, 33):
    with pytest.raises(ValueError, match=f'docs_per_row={bad} must be between 1 and seq_len=32'):
      synthetic_batch(8, 32, docs_per_row=bad)


def test_document_lengths_are_recovered_from_positions():
  np.testing.assert_array_equal(document_lengths(packed_positions([[5, 3, 8], [16], [1, 15]])), [5, 3, 8, 16, 1, 15])
  np.testing.assert_array_equal(document_lengths(np.array([[3, 4, 5, 0, 1, 2]])), [3, 3])  # a row begun mid-document
  # A batch's rows hold seq_len + 1 tokens; the model sees the first seq_len: a document whose only
  # token is the last target is not part of the work.
  batch = dict(tokens=np.zeros((2, 9), np.int32), positions=np.asarray(packed_positions([[4, 5], [8, 1]])))
  np.testing.assert_array_equal(document_lengths(split_batch(batch)[1]), [4, 4, 8])
  with pytest.raises(ValueError, match='padding'):
    document_lengths(packed_positions([[4], [2]]))


def test_mfu_counts_the_attention_within_documents_and_maxtext_the_whole_row():
  """The benchmark's `mfu` and `mfu_maxtext` are tokens/s x these FLOPs over the peak: at the same step
  time, mfu <= mfu_maxtext with several documents a row, equal with one."""
  model, seq_len, heads, head_dim, layers = tiny_model(), 64, 4, 8, 2
  for docs_per_row in (1, 4):
    positions = split_batch(synthetic_batch(4, seq_len, seed=1, docs_per_row=docs_per_row))[1]
    flops = train_flops_per_token(model, seq_len, positions)
    done, maxtext = flops['train_flops_per_token'], flops['train_flops_per_token_maxtext']
    assert maxtext == pytest.approx(3 * model.flops_per_token(seq_len))
    if docs_per_row == 1:
      assert done == pytest.approx(maxtext)
      continue
    assert done < maxtext
    # The difference is attention alone: 2 x 2 x heads x head_dim a visible key, a query seeing the
    # earlier keys of its document (l (l + 1) / 2 a document) instead of those of its row.
    lengths = document_lengths(positions)
    visible_in_documents = np.sum(lengths * (lengths + 1) / 2) / positions.size
    attention = 3 * layers * 2 * 2 * heads * head_dim * ((seq_len + 1) / 2 - visible_in_documents)
    assert maxtext - done == pytest.approx(attention)


def test_peer_needs_one_document_a_row_unless_it_takes_the_documents(monkeypatch):
  assert peer_docs_per_row('transformer', 1) == 1
  assert peer_docs_per_row('griffin', 4) == 4  # recurrentgemma reads the positions: masked, reset per document
  with pytest.raises(ValueError, match=r'--peer with --docs_per_row=4: the transformer peer attends across '
                                       r'documents.*pass --docs_per_row=1'):
    peer_docs_per_row('transformer', 4)
  # The peer's result says what it ran at (a stand-in for the peer module: no torch or recurrentgemma here).
  ran_at = []

  def fake_benchmark(config, num_steps, warmup, docs_per_row):
    ran_at.append(docs_per_row)
    return dict(tokens_per_s=1.0)

  monkeypatch.setattr(peers.importlib, 'import_module', lambda name: types.SimpleNamespace(benchmark=fake_benchmark))
  griffin = ml_collections.ConfigDict(dict(model=dict(name='griffin')))
  assert benchmark_peer(griffin, 1, 1, docs_per_row=4) == dict(tokens_per_s=1.0, docs_per_row=4)
  with pytest.raises(ValueError, match='--peer with --docs_per_row=4'):
    benchmark_peer(ml_collections.ConfigDict(dict(model=dict(name='transformer'))), 1, 1, docs_per_row=4)
  assert ran_at == [4]
  process = subprocess.run([sys.executable, '-m', 'experiments.benchmark', '--peer',
                            '--config=experiments/configs/transformer.py:tiny'], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert process.returncode == 1
  fatal = [line for line in process.stderr.splitlines() if line.startswith('FATAL')]
  assert len(fatal) == 1 and '--peer with --docs_per_row=4' in fatal[0] and 'pass --docs_per_row=1' in fatal[0]


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


def reference_operator(name: str):
  """The operator `name` of the op benchmark in its plainest form: recurrences step by step, attention
  as a dense causal softmax in float32."""
  if name.startswith('wkv'):
    return lambda r, k, v, log_w, u: wkv(r, k, v, log_w, u, jnp.zeros(r.shape[:2], bool), impl='recurrent')[0]
  if name == 'gated_retention':
    return lambda q, k, v, g: recurrent_retention(q, k, v, g, jnp.zeros(q.shape[:2], bool))[0]
  if name.startswith('rg_lru'):
    positions = lambda x: jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    return lambda x, gates, a: rg_lru(x, gates, a, positions(x), None, impl='sequential')[0]

  def attention(q, k, v):  # causal, within each document of the benchmark's packed rows
    documents = packed_documents(*q.shape[:2])
    scores = jnp.einsum('bthd,bshd->bhts', q, k) * q.shape[-1] ** -0.5
    visible = jnp.tril(jnp.ones(scores.shape[-2:], bool)) & (documents[:, None, :, None] == documents[:, None, None])
    return jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1), v)
  return attention


@pytest.mark.parametrize('name', ['wkv', 'wkv_chunked', 'gated_retention', 'attention', 'rg_lru', 'rg_lru_xla'])
def test_operator_benchmark_times_the_operator_it_names(name):
  """What the op benchmark times computes the named operator (equal to its plainest form), and the time
  reported is the median of the timed steps."""
  make_inputs, forward = OPERATORS[name]
  inputs = [x.astype(jnp.float32) for x in make_inputs(jax.random.key(0), 2, 32, 2, 8)]  # float32: exact forms
  np.testing.assert_allclose(forward(*inputs), reference_operator(name)(*inputs), rtol=1e-4, atol=1e-4)
  result = benchmark_operator(name, batch=1, seq_len=32, heads=2, head_dim=8, num_steps=3)
  assert result['operator'] == name and len(result['fwd_bwd_s_all']) == 3
  assert result['fwd_bwd_s'] == statistics.median(result['fwd_bwd_s_all'])


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
  rows = [dict(context=4096, batch=1, decode_tokens_per_s=10.0),
          dict(context=4096, batch=64, decode_tokens_per_s=500.0),
          dict(context=4096, batch=16, largest_batch=True, decode_tokens_per_s=300.0),
          dict(context=65536, batch=1, decode_tokens_per_s=8.0), dict(context=131072, batch=1)]  # prefill only
  assert throughput_by_context({'results': rows}) == ([4096, 65536], [300.0, 8.0])


@pytest.mark.parametrize('args, message', [
    (['--mode=train', '--config=experiments/configs/transformer.py:tiny', '--contexts=4096'],
     '--contexts is a --mode=decode flag; --mode=train does not read it'),
    (['--mode=op', '--warmup=3'], '--warmup is a --mode=train flag; --mode=op does not read it'),
    (['--mode=decode', '--config=experiments/configs/transformer.py:tiny', '--timed_steps=3'],
     '--timed_steps is a --mode=train and --mode=op flag; --mode=decode does not read it'),
])
def test_a_flag_of_another_mode_is_refused_in_one_line(args, message):
  process = subprocess.run([sys.executable, '-m', 'experiments.benchmark', *args], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert process.returncode == 1
  fatal = [line for line in process.stderr.splitlines() if line.startswith('FATAL')]
  assert len(fatal) == 1 and message in fatal[0], process.stderr[-2000:]
