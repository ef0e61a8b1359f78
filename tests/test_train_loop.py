"""The training loop end to end on the embedded corpus: loss falls, a stopped
run resumes bitwise (same data, same parameters), gradient accumulation equals
one big batch, the step on the state's flat leaves equals the step on the
TrainState, finiteness is flagged per leaf, the first compiles of the train
and eval steps are logged and timed, evaluation writes loss and bits per byte,
the binaries run (evaluate and sample on the workdir's recorded config, with
readable logs)."""
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import packed_positions, random_tokens, read_metrics, tiny_experiment
from trainers.checkpoints import Checkpointer
from trainers.experiment import Experiment
from trainers.training import steps
from trainers.training.evaluator import evaluate_checkpoint
from trainers.training.jitted_step import TrainStep
from trainers.training.train_loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def final_params(config, workdir):
  exp = Experiment.build(config)
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=1, keep=10)
  with exp.activate():
    state, data_state = checkpointer.restore(checkpointer.latest_step(), exp.restore_target())
  checkpointer.close()
  return jax.device_get(state.params), data_state


@pytest.fixture(scope='module')
def straight_run(data_dir, tmp_path_factory):
  config = tiny_experiment(data_dir, total_steps=30)
  workdir = str(tmp_path_factory.mktemp('straight'))
  train(config, workdir)
  return config, workdir


def test_loss_falls_and_metrics_are_logged(straight_run):
  _, workdir = straight_run
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == [1, 5, 10, 15, 20, 25, 30]  # step 1: the loss at the start
  assert {'loss', 'learning_rate', 'tokens_per_s', 'grad_norm', 'eval_loss', 'eval_bits_per_byte'} <= set(records[2])
  assert records[-1]['loss'] < records[1]['loss'] - 0.5
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '30'))


def test_stopped_run_resumes_bitwise(straight_run, tmp_path):
  config, straight_dir = straight_run
  workdir = str(tmp_path)
  train(config, workdir, stop_at=17)  # stops off the checkpoint interval, with a checkpoint
  assert max(r['step'] for r in read_metrics(workdir)) == 15
  train(config, workdir)
  strip = lambda records: [{k: v for k, v in r.items() if k not in ('tokens_per_s', 'eta_s')} for r in records]
  assert strip(read_metrics(workdir)) == strip(read_metrics(straight_dir))
  resumed, resumed_data = final_params(config, workdir)
  straight, straight_data = final_params(config, straight_dir)
  assert resumed_data == straight_data
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)


def test_gradient_accumulation_equals_one_batch(data_dir):
  batch = dict(tokens=np.asarray(random_tokens((8, 33), 257)),
               positions=np.asarray(packed_positions([[33], [10, 23], [33], [5, 28]] * 2)))
  results = []
  for micro_batches in (1, 4):
    config = tiny_experiment(data_dir, **{'model.dtype': 'float32', 'grad_accum_steps': micro_batches})
    exp = Experiment.build(config, jax.devices()[:2])  # micro-batches of 2 rows, one per device
    with exp.activate():
      step = jax.jit(steps.make_train_step(exp.graphdef, exp.tx, exp.schedule, micro_batches))
      results.append(step(exp.new_state(), exp.device_batch(batch)))
  (one, one_metrics), (accumulated, accumulated_metrics) = results
  assert float(accumulated_metrics['loss']) == pytest.approx(float(one_metrics['loss']), rel=1e-6)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(accumulated.params)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_step_on_leaves_equals_step_on_train_state(data_dir):
  config = tiny_experiment(data_dir, **{'model.dtype': 'float32'})
  batch = dict(tokens=np.asarray(random_tokens((4, 33), 257)),
               positions=np.asarray(packed_positions([[33], [10, 23]] * 2)))
  exp = Experiment.build(config, jax.devices()[:2])
  with exp.activate():
    on_state, state_metrics = jax.jit(steps.make_train_step(exp.graphdef, exp.tx, exp.schedule))(
        exp.new_state(), exp.device_batch(batch))
    step = TrainStep(exp)
    leaves, leaf_metrics = step(step.leaves(exp.new_state()), exp.device_batch(batch))
  on_leaves = step.state(leaves)
  assert jax.tree.structure(on_leaves) == jax.tree.structure(on_state)
  for a, b in zip(jax.tree.leaves((on_state, state_metrics)), jax.tree.leaves((on_leaves, leaf_metrics))):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)  # bitwise on CPU; a GPU may fuse the two differently


def test_first_compiles_are_logged_and_timed(data_dir, tmp_path, caplog):
  caplog.set_level('INFO')
  train(tiny_experiment(data_dir, total_steps=1, eval_batches=1), str(tmp_path))
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(('compiling ', 'compiled '))]
  assert len(lines) == 4, lines
  assert lines[0] == 'compiling the train step'
  assert re.fullmatch(r'compiled the train step and ran it once in \d+\.\d s', lines[1])
  assert lines[2] == 'compiling the evaluation step for batches of 8 rows of 32 tokens'
  assert re.fullmatch(r'compiled the evaluation step for batches of 8 rows of 32 tokens and ran it once in '
                      r'\d+\.\d s', lines[3])


def test_finite_leaves_names_each_bad_leaf():
  grads = dict(a=jnp.ones(3), b=jnp.array([1.0, jnp.nan]), c=jnp.array([-jnp.inf]), d=jnp.full((2,), 3e19))
  assert steps.finite_leaves(jnp.float32(2.0), grads).tolist() == [True, True, False, False, False]  # d: norm > 1.8e19
  assert not steps.finite_leaves(jnp.float32(jnp.nan), dict(a=jnp.ones(3)))[0]


def test_evaluate_checkpoint_reports_bits_per_byte(straight_run):
  config, workdir = straight_run
  results = evaluate_checkpoint(config, workdir, num_batches=2)
  assert results['step'] == 30
  assert results['perplexity'] == pytest.approx(math.exp(results['loss']))
  # Byte targets are all targets but the document ends, so bits/byte is at least loss / ln 2.
  assert results['loss'] / math.log(2) <= results['bits_per_byte'] < 1.1 * results['loss'] / math.log(2)
  assert 3.0 < results['unigram_entropy_bits'] < 8.0


def run_binary(binary: str, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
  process = subprocess.run([sys.executable, '-m', f'experiments.{binary}', *flags], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert not check or process.returncode == 0, process.stderr[-3000:]
  return process


@pytest.mark.slow  # four runs of the train, evaluate and sample binaries
@pytest.mark.fault('evaluate and sample run without --config, or evaluate with a --config lacking the dataset flags '
                   'training had', "they use the workdir's recorded config; the other data is refused naming each "
                   'field and --other_dataset; eval.json names the dataset and the step; evaluate logs its '
                   'progress; the training log starts at step 1 and has no progress bars')
def test_train_evaluate_and_sample_binaries(data_dir, tmp_path):
  """Issue 30.4 and 30.6: evaluate and sample take the workdir's recorded config (a --config with another
  dataset is refused), eval.json names the dataset and the step, evaluate logs its progress, the first loss
  logged is step 1's, and a build leaves no progress bars in the saved log."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(8):
    (corpus / f'doc{i}.txt').write_text(f'Document {i}: ' + ' '.join(f'word{(i * j) % 97}' for j in range(300)))
  workdir = tmp_path / 'run'
  flags = [f'--workdir={workdir}', '--config.total_steps=4', '--config.log_every=2', '--config.eval_batches=1',
           '--config.model.dim=32', '--config.model.mlp_dim=64', '--config.seq_len=64', '--config.batch_size=8',
           f'--config.dataset.data_dir={data_dir}', '--config.profile_steps=(2,)', '--config.eval_extrapolation=(2,)',
           '--config.eval_tasks=("mqar",)', '--config.dataset.name=local_text', f'--config.dataset.path={corpus}',
           '--config.dataset.validation_fraction=0.3']
  trained = run_binary('train', '--config=experiments/configs/sliding.py:tiny', *flags)
  assert [r['step'] for r in read_metrics(workdir)] == [1, 2, 4]
  assert list(workdir.glob('profile/**/*.xplane.pb'))  # the trace of step 2
  assert '\r' not in trained.stderr and 'it/s' not in trained.stderr and 'examples/s' not in trained.stderr
  evaluated = run_binary('evaluate', f'--workdir={workdir}', '--num_batches=1')
  assert 'evaluating the checkpoint of step 4 on the validation split of local_text' in evaluated.stderr
  assert 'validation split: 1 batches in' in evaluated.stderr
  with open(workdir / 'eval.json') as f:
    results = json.load(f)
  assert {'loss', 'bits_per_byte', 'perplexity', 'extrapolation', 'tasks'} <= set(results)
  assert results['step'] == 4
  assert (results['dataset']['name'], results['dataset']['path']) == ('local_text', str(corpus))
  assert (workdir / 'eval_4.json').read_text() == (workdir / 'eval.json').read_text()
  refused = run_binary('evaluate', '--config=experiments/configs/sliding.py:tiny', f'--workdir={workdir}',
                       '--config.model.dim=32', '--config.model.mlp_dim=64', check=False)  # the data flags left out
  assert refused.returncode != 0
  assert "config.dataset.name: 'local_text' in the workdir, 'python_stdlib' now" in refused.stderr
  assert '--other_dataset' in refused.stderr
  sampled = run_binary('sample', f'--workdir={workdir}', '--prompt=Document', '--max_new_tokens=4', '--temperature=0')
  assert sampled.stdout.startswith("--- 'Document'\nDocument")
