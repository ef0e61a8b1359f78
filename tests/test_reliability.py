"""Faults injected into training: SIGKILL at random points (one during a
checkpoint write), SIGTERM, truncated and edited checkpoints, NaN/Inf, a
workdir of another model or held by another trainer, an unknown config field,
bad data, bad workdir files, a changed corpus, a decode cache written past its
length. Each ends where a careful user wants it to: a resumed run equals an
uninterrupted one bitwise on CPU (same compiled program on the same inputs),
nothing good is ever overwritten, evaluate and sample change nothing but their
outputs, and a mistake is named in one line."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import architectures
from tests.helpers import family_tiny_config, jitted, random_tokens, tiny_experiment
from trainers.checkpoints import Checkpointer, CorruptCheckpointError, StateMismatchError
from trainers.experiment import Experiment
from trainers.logs import has_accelerator
from trainers.run_config import WorkdirMismatchError, config_for, record_or_check
from trainers.training import workdir_lock
from trainers.training.evaluator import evaluate_checkpoint, write_results
from trainers.training.run_history import EarlierRunError
from trainers.training.train_loop import NonFiniteError, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS, CHECKPOINT_EVERY = 40, 5


def command(workdir, data_dir, mode):
  return [sys.executable, '-m', 'experiments.train', '--config=experiments/configs/transformer.py:tiny',
          f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}', f'--config.total_steps={TOTAL_STEPS}',
          '--config.log_every=1', f'--config.checkpoint_every={CHECKPOINT_EVERY}', '--config.eval_every=1000',
          '--config.eval_batches=1', '--config.model.dim=32', '--config.model.mlp_dim=64', '--config.seq_len=32',
          '--config.batch_size=8', f'--config.streaming.enabled={mode == "streaming"}']


def start(workdir, data_dir, mode='packed'):
  return subprocess.Popen(command(workdir, data_dir, mode), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=dict(os.environ, JAX_PLATFORMS='cpu'), text=True)


def logged_steps(workdir) -> list[int]:
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return [json.loads(line)['step'] for line in f if line.endswith('\n')]
  except (FileNotFoundError, json.JSONDecodeError):
    return []


def wait_until(condition, process, timeout=240.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if condition():
      return True
    if process.poll() is not None:
      return False
    time.sleep(0.002)
  raise TimeoutError('the training process neither reached the point nor ended')


def loss_curve(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in ('tokens_per_s', 'eta_s', 'mfu')} for line in f]


def final_state(workdir, data_dir, config=None, mode='packed'):
  config = config or tiny_experiment(data_dir, **{'model.dim': 32, 'model.mlp_dim': 64,
                                                  'streaming.enabled': mode == 'streaming'})
  exp = Experiment.build(config)
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=1, keep=100)
  with exp.activate():
    step, state, data_state = checkpointer.restore_latest(exp.restore_target())
  checkpointer.close()
  return step, jax.device_get(state.params), data_state


_STRAIGHT_RUNS = {}


def straight_run(mode, tmp_path_factory, data_dir):
  """The uninterrupted run of `mode` ('packed' or 'streaming'), trained once per module."""
  if mode not in _STRAIGHT_RUNS:
    workdir = tmp_path_factory.mktemp(f'straight_{mode}')
    process = start(workdir, data_dir, mode)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    _STRAIGHT_RUNS[mode] = workdir
  return _STRAIGHT_RUNS[mode]


@pytest.fixture
def straight(tmp_path_factory, data_dir):
  return straight_run('packed', tmp_path_factory, data_dir)


def assert_same_run(workdir, reference, data_dir, mode='packed'):
  assert loss_curve(workdir) == loss_curve(reference)
  step, params, data_state = final_state(workdir, data_dir, mode=mode)
  ref_step, ref_params, ref_data_state = final_state(reference, data_dir, mode=mode)
  assert (step, data_state) == (ref_step, ref_data_state) == (TOTAL_STEPS, ref_data_state)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # 4 starts of the training binary
@pytest.mark.parametrize('mode', ['packed', 'streaming'])
@pytest.mark.fault('SIGKILL at 3 random points, one of them inside an async checkpoint write; restarted each time '
                   'with the same command (packed rows, and long-document streaming with its carried cache)',
                   'resumes from the last complete checkpoint (the half-written one is ignored); final parameters '
                   'and the whole loss curve equal the uninterrupted run bitwise')
def test_sigkill_at_random_points_resumes_bitwise(mode, tmp_path_factory, tmp_path, data_dir):
  straight = straight_run(mode, tmp_path_factory, data_dir)
  rng = np.random.default_rng(0)
  checkpoints = tmp_path / 'checkpoints'
  in_write = lambda: any('tmp' in p.name for p in checkpoints.glob('*')) if checkpoints.exists() else False
  triggers = [
      ('step', int(rng.integers(3, 12))),
      ('checkpoint write', None),
      ('step', int(rng.integers(24, 34))),
  ]
  killed_mid_write = False
  for kind, at in triggers:
    process = start(tmp_path, data_dir, mode)
    if kind == 'step':
      condition = lambda: max(logged_steps(tmp_path), default=0) >= at
    else:
      condition = in_write
    reached = wait_until(condition, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert reached, f'the run ended before the kill point {kind} {at}: {process.stderr.read()[-2000:]}'
    if kind == 'checkpoint write':
      killed_mid_write = any('tmp' in p.name for p in checkpoints.glob('*'))
  assert killed_mid_write, 'the kill did not land inside a checkpoint write'
  process = start(tmp_path, data_dir, mode)
  assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]
  assert_same_run(tmp_path, straight, data_dir, mode)


@pytest.mark.slow
@pytest.mark.fault('SIGTERM (preemption) in the middle of training',
                   'finishes the step, writes a checkpoint there (off the save interval), exits 0; the next start '
                   'resumes and ends equal to the uninterrupted run')
def test_sigterm_saves_and_exits_cleanly(straight, tmp_path, data_dir):
  process = start(tmp_path, data_dir)
  wait_until(lambda: max(logged_steps(tmp_path), default=0) >= 12, process)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=120) == 0
  assert not (tmp_path / 'lock').exists()
  saved = max(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved == max(logged_steps(tmp_path)) and saved < TOTAL_STEPS
  process = start(tmp_path, data_dir)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0 and f'resumed from the checkpoint of step {saved}' in stderr
  assert_same_run(tmp_path, straight, data_dir)


def corrupt_copy(straight, tmp_path, how):
  workdir = tmp_path / 'run'
  shutil.copytree(straight, workdir)
  latest = max(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  # The array data files (orbax OCDBT: every file in a `d/` folder).
  for target in (p for p in (workdir / 'checkpoints' / str(latest) / 'state').rglob('d/*') if p.is_file()):
    data = bytearray(target.read_bytes())
    if how == 'truncate':
      target.write_bytes(data[:len(data) // 2])
    else:
      middle = len(data) // 2
      data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
      target.write_bytes(data)
  return workdir, latest


@pytest.mark.parametrize('how', ['truncate', 'edit'])
@pytest.mark.fault('the latest checkpoint truncated, or 4 bytes flipped in each of its array data files',
                   'detected (read error or checksum mismatch), reported by step, set aside as <step>.corrupt; the '
                   'previous checkpoint is restored')
def test_corrupt_latest_checkpoint_falls_back(straight, tmp_path, data_dir, how, caplog):
  workdir, latest = corrupt_copy(straight, tmp_path, how)
  step, _, _ = final_state(workdir, data_dir)
  assert step == latest - CHECKPOINT_EVERY
  assert (workdir / 'checkpoints' / f'{latest}.corrupt').is_dir()
  assert f'checkpoint of step {latest}' in caplog.text and 'unusable' in caplog.text


@pytest.mark.fault('every checkpoint of a workdir corrupted; then the same command again, then with --restart',
                   'refuses to start (CorruptCheckpointError naming the directory), and again on the next start '
                   '(EarlierRunError naming --restart) with metrics.jsonl untouched; --restart moves the earlier run '
                   'to earlier_runs/1/ and trains a new model')
def test_no_usable_checkpoint_refuses_to_start_over(straight, tmp_path, data_dir):
  workdir = tmp_path / 'run'
  shutil.copytree(straight, workdir)
  history = (workdir / 'metrics.jsonl').read_text()
  for step_dir in (workdir / 'checkpoints').iterdir():
    for f in (step_dir / 'state').rglob('*'):
      if f.is_file():
        f.write_bytes(b'')
  with pytest.raises(CorruptCheckpointError, match='refusing to start from scratch'):
    final_state(workdir, data_dir)
  # Issue 30.1: the next start found only `<step>.corrupt` folders and started a new model over the history.
  with pytest.raises(EarlierRunError, match=r'set aside as corrupt .*metrics\.jsonl has 40 records.* --restart'):
    train(tiny_experiment(data_dir, **{'model.dim': 32, 'model.mlp_dim': 64}), str(workdir))
  assert (workdir / 'metrics.jsonl').read_text() == history
  restart = [arg for arg in command(workdir, data_dir, 'packed') if 'total_steps' not in arg]
  process = subprocess.run([*restart, '--config.total_steps=2', '--restart'], cwd=REPO, capture_output=True,
                           text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert process.returncode == 0, process.stderr[-3000:]
  assert (workdir / 'earlier_runs' / '1' / 'metrics.jsonl').read_text() == history
  assert list((workdir / 'earlier_runs' / '1' / 'checkpoints').glob('*.corrupt'))
  assert logged_steps(workdir) == [1, 2]


def listing(workdir) -> list[str]:
  return sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*'))


@pytest.mark.fault('sample and evaluate on a workdir whose checkpoints are all truncated, on one with no checkpoints/, '
                   'and beside a running trainer (its lock held)',
                   'one line naming the unusable checkpoints and train --restart (sample exits 1), or "train first"; '
                   'nothing in the workdir is renamed, deleted or created except evaluate\'s eval files')
def test_evaluate_and_sample_change_nothing_but_their_outputs(straight, tmp_path, data_dir):
  workdir = tmp_path / 'run'
  shutil.copytree(straight, workdir)
  config = config_for(str(workdir), None, check_dataset=True)
  with workdir_lock.hold(workdir):  # a trainer runs there
    before = listing(workdir)
    write_results(workdir, evaluate_checkpoint(config, str(workdir), num_batches=1))
    assert sorted(set(listing(workdir)) - set(before)) == ['eval.json', f'eval_{TOTAL_STEPS}.json']
  for f in (workdir / 'checkpoints').rglob('*'):
    if f.is_file() and 'state' in f.parts:
      f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
  before = listing(workdir)
  sampled = subprocess.run([sys.executable, '-m', 'experiments.sample', f'--workdir={workdir}', '--max_new_tokens=2'],
                           cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                           timeout=120)
  steps = [str(s) for s in range(TOTAL_STEPS, 0, -CHECKPOINT_EVERY)][:3]
  assert sampled.returncode == 1
  assert sampled.stderr.strip().splitlines()[-1].endswith(
      f'no usable checkpoint in {workdir / "checkpoints"}: steps {", ".join(steps)} cannot be read (see the log); '
      'left as they are. Train a new model there with `python -m experiments.train --restart`, or use another '
      '--workdir.')
  with pytest.raises(CorruptCheckpointError, match=r'steps .* cannot be read .* experiments\.train --restart'):
    evaluate_checkpoint(config, str(workdir), num_batches=1)
  assert listing(workdir) == before
  shutil.rmtree(workdir / 'checkpoints')
  with pytest.raises(FileNotFoundError, match=r'no checkpoint under .*checkpoints; train first'):
    evaluate_checkpoint(config, str(workdir), num_batches=1)
  assert not (workdir / 'checkpoints').exists()


@pytest.mark.fault('a workdir whose metrics.jsonl has records but no checkpoint (a run killed before its first save)',
                   'the new start moves that history to earlier_runs/1/ with a warning; never truncates it')
def test_metrics_without_a_checkpoint_are_kept(tmp_path):
  from trainers.training import run_history
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')
  run_history.before_fresh_start(str(tmp_path), corrupt=[])
  assert not (tmp_path / 'metrics.jsonl').exists()
  assert logged_steps(tmp_path / 'earlier_runs' / '1') == [1, 2]


@pytest.mark.fault('NaN/Inf in the loss and gradients (learning rate 1e30)',
                   "stops at the next sync point naming the step and the first non-finite leaf; the bad state is "
                   "not saved; with config.on_nonfinite='skip' the bad steps are dropped and counted")
def test_nonfinite_stops_without_saving_or_is_skipped(tmp_path, data_dir):
  config = tiny_experiment(data_dir, total_steps=8, log_every=4, checkpoint_every=4, eval_every=1000,
                           **{'optimizer.learning_rate': 1e30, 'optimizer.warmup_steps': 0,
                              'optimizer.clip_norm': 0.0})
  # Step 1's update is finite (if huge); step 2's loss is not. Orbax saves the first step, then every 4th.
  with pytest.raises(NonFiniteError, match=r'non-finite (loss|grad\S+) at step 2; stopping without saving '
                                           r'\(the last checkpoint verified finite is step 1\)'):
    train(config, str(tmp_path / 'stop'))
  assert sorted(int(p.name) for p in (tmp_path / 'stop' / 'checkpoints').iterdir() if p.name.isdigit()) == [1]
  config.on_nonfinite = 'skip'
  last = train(config, str(tmp_path / 'skip'))
  assert last['skipped_steps'] == 7  # every step after the first update is non-finite
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final_state(tmp_path / 'skip', data_dir, config)[1]))


@pytest.mark.fault('an update that turns the parameters NaN while loss and gradients stay finite (updates scaled by '
                   "NaN), with config.on_nonfinite='skip'; a NaN checkpoint written by an older version",
                   'NonFiniteError at the first save, which writes nothing ("the last checkpoint verified finite is '
                   'none"); the NaN checkpoint is unusable on restore: set aside, never called good')
def test_nonfinite_parameters_are_never_saved(tmp_path, data_dir, monkeypatch):
  from trainers import checkpoints, experiment
  make_optimizer = experiment.make_optimizer
  monkeypatch.setattr(experiment, 'make_optimizer', lambda config: (
      optax.chain(make_optimizer(config)[0], optax.scale(float('nan'))), make_optimizer(config)[1]))
  config = tiny_experiment(data_dir, total_steps=4, log_every=1, checkpoint_every=2, eval_every=1000,
                           on_nonfinite='skip')
  with pytest.raises(NonFiniteError, match=r'parameters or optimizer state hold NaN/Inf at step 1; not saved \(the '
                                           r'last checkpoint verified finite is none'):
    train(config, str(tmp_path / 'run'))
  assert not [p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir() if not p.name.startswith('.')]
  exp = Experiment.build(config)
  with exp.activate():
    good = exp.new_state()
  bad = good.replace(params=jax.tree.map(lambda x: x * np.nan, good.params))
  older = Checkpointer(tmp_path / 'older' / 'checkpoints', keep=5)
  older.save(2, good, {})
  meta = dict(data={}, checksums=[int(c) for c in checkpoints.state_summary(bad)[0]],
              structure=checkpoints.state_structure(bad))
  older.manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(bad), meta=ocp.args.JsonSave(meta)))
  older.close()
  assert final_state(tmp_path / 'older', data_dir, config)[0] == 2
  assert (tmp_path / 'older' / 'checkpoints' / '4.corrupt').is_dir()


@pytest.mark.fault('restoring a checkpoint with a config whose optimizer state has another layout',
                   'StateMismatchError naming the differing arrays; the intact checkpoint is left in place')
def test_checkpoint_of_another_layout_is_not_called_corrupt(straight, tmp_path, data_dir):
  workdir = tmp_path / 'run'
  shutil.copytree(straight, workdir)
  other = tiny_experiment(data_dir, **{'model.dim': 32, 'model.mlp_dim': 64, 'optimizer.clip_norm': 0.0})
  with pytest.raises(StateMismatchError, match='holds .* arrays, this config expects'):
    final_state(workdir, data_dir, other)
  assert not list((workdir / 'checkpoints').glob('*.corrupt*'))


@pytest.mark.fault('resuming a workdir with a different model config, or of another family',
                   'refuses before compiling and names each differing config.model field; for another family the '
                   "error's first line names both families")
def test_workdir_of_another_model_is_refused(tmp_path, data_dir):
  record_or_check(tiny_experiment(data_dir), str(tmp_path))
  changed = tiny_experiment(data_dir, **{'model.dim': 64, 'model.attention_impl': 'xla'})
  with pytest.raises(WorkdirMismatchError, match=r'config\.model\.dim: 32 in the workdir, 64 now\.') as error:
    train(changed, str(tmp_path))
  assert 'attention_impl' not in str(error.value)  # a runtime field may change on resume
  record_or_check(family_tiny_config('griffin', data_dir), str(tmp_path / 'griffin'))
  with pytest.raises(WorkdirMismatchError) as error:
    train(tiny_experiment(data_dir), str(tmp_path / 'griffin'))
  first_line = str(error.value).splitlines()[0]
  assert "'griffin'" in first_line and "'transformer'" in first_line and len(first_line) < 200


@pytest.mark.fault('a config override of a field that does not exist (--config.model.foo=1)',
                   'exits 1 before anything starts, with one line: unknown field config.model.foo and the known '
                   'fields of config.model')
def test_unknown_config_field_is_one_line(tmp_path):
  process = subprocess.run([sys.executable, '-m', 'experiments.train', f'--workdir={tmp_path / "run"}',
                            '--config=experiments/configs/transformer.py:tiny', '--config.model.foo=1'],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
  assert process.returncode == 1
  assert process.stderr.strip().splitlines() == [
      'FATAL Flags parsing error: unknown field config.model.foo; known: attention_impl, dim, dtype, head_dim, '
      'input_features, logits_soft_cap, mlp_activation, mlp_dim, name, norm_eps, num_heads, num_kv_heads, '
      'num_layers, param_dtype, remat, rope_base, rope_fraction, rope_style, scan_layers, tie_embeddings, '
      'vocab_size, window']
  assert not (tmp_path / 'run').exists()


@pytest.mark.fault('a run on a data directory that does not exist, started as a newcomer does (JAX_PLATFORMS unset, '
                   'the libtpu wheel installed, no TPU)',
                   'fails naming config.dataset.path; removes the workdir it created; no libtpu "unexpected worker '
                   'hostname" lines')
def test_failed_start_leaves_no_workdir_and_no_tpu_noise(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  process = subprocess.run([*command(workdir, data_dir, 'packed'), '--config.dataset.name=local_text',
                            f'--config.dataset.path={tmp_path / "no_such_dir"}'], cwd=REPO, capture_output=True,
                           text=True, env=env, timeout=120)
  assert process.returncode != 0 and 'config.dataset.path=' in process.stderr
  assert not workdir.exists(), sorted(p.name for p in workdir.rglob('*'))
  if not has_accelerator():
    assert 'unexpected worker hostname' not in process.stderr


@pytest.mark.fault('a metrics.jsonl whose last line was cut by a kill',
                   'the resumed run drops the cut line and the records past its checkpoint, then rewrites them')
def test_cut_metrics_line_is_dropped_on_resume(tmp_path):
  from trainers.training.metrics import MetricsWriter
  writer = MetricsWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(step, dict(loss=1.0 / step))
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 4, "lo')
  writer.drop_records_after(2)
  assert [json.loads(line)['step'] for line in open(tmp_path / 'metrics.jsonl')] == [1, 2]


@pytest.mark.fault('metrics.jsonl with a {"foo": 1} line and a non-JSON line amid its records; a config.json that '
                   'is not JSON (train, evaluate, sample)',
                   'the resumed run drops each bad line with a warning naming the file and the line; config.json: '
                   'one line naming the file and what to do')
def test_bad_metrics_lines_and_config_json_are_named(tmp_path, data_dir, caplog):
  from trainers.training.metrics import MetricsWriter
  writer = MetricsWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(step, dict(loss=1.0 / step))
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines(keepends=True)
  (tmp_path / 'metrics.jsonl').write_text(''.join([lines[0], '{"foo": 1}\n', lines[1], 'not json\n', lines[2]]))
  writer.drop_records_after(3)
  assert logged_steps(tmp_path) == [1, 2, 3]
  for number, line in ((2, '{"foo": 1}'), (4, 'not json')):
    assert f'{tmp_path / "metrics.jsonl"} line {number} is not a metrics record' in caplog.text
    assert f'dropped: {line}' in caplog.text
  (tmp_path / 'config.json').write_text('{"model": ')
  message = rf'^{tmp_path / "config.json"} is not valid JSON: .*; it records the config .* use another --workdir$'
  with pytest.raises(ValueError, match=message):
    train(tiny_experiment(data_dir), str(tmp_path))
  with pytest.raises(ValueError, match=message):
    config_for(str(tmp_path), None, check_dataset=True)


@pytest.mark.fault('sample --top_k=100000 with a vocabulary of 384',
                   'exits 1 before loading the model, with one line naming the flag')
def test_sample_top_k_over_the_vocabulary_is_named(tmp_path, data_dir):
  record_or_check(tiny_experiment(data_dir, **{'model.vocab_size': 384}), str(tmp_path))
  process = subprocess.run([sys.executable, '-m', 'experiments.sample', f'--workdir={tmp_path}', '--top_k=100000'],
                           cwd=REPO, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert process.returncode == 1
  assert process.stderr.strip().splitlines()[-1] == (
      "ValueError: --top_k=100000: more than the model's 384 tokens (config.model.vocab_size); 0 samples among "
      'all of them')


@pytest.mark.fault('evaluate after files of the local corpus a run trained on were added and edited; then with that '
                   "build deleted from data_dir",
                   'evaluates the validation split of the build the run trained on (a warning says the files '
                   'changed), builds nothing new; without that build it refuses, naming the build and the fix')
def test_evaluate_after_the_corpus_changed_scores_the_build_trained_on(tmp_path, caplog):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(12):
    (corpus / f'doc{i}.txt').write_text(f'Document {i}: ' + ' '.join(f'word{(i * j) % 89}' for j in range(200)))
  config = tiny_experiment(tmp_path / 'tfds', total_steps=2, log_every=1, eval_every=1000, eval_extrapolation=(),
                           eval_tasks=(), **{'dataset.name': 'local_text', 'dataset.path': str(corpus),
                                             'dataset.validation_fraction': 0.3})
  train(config, str(tmp_path / 'run'))
  builds = sorted(p.name for p in (tmp_path / 'tfds' / 'local_text').iterdir() if not p.name.startswith('.'))
  for i in range(12, 24):
    (corpus / f'doc{i}.txt').write_text(f'New document {i}: ' + ' '.join(f'word{j % 89}' for j in range(200)))
  (corpus / 'doc0.txt').write_text('edited')
  results = evaluate_checkpoint(config, str(tmp_path / 'run'), num_batches=1)
  assert results['dataset']['build'].split('/')[1].split(':')[0] == builds[0]
  assert results['dataset']['train']['documents'] + results['dataset']['validation']['documents'] == 12
  assert 'changed since the run trained on them' in caplog.text
  assert sorted(p.name for p in (tmp_path / 'tfds' / 'local_text').iterdir() if not p.name.startswith('.')) == builds
  shutil.rmtree(tmp_path / 'tfds' / 'local_text' / builds[0])
  with pytest.raises(ValueError, match=rf'the build {builds[0]} of {corpus} that the run trained on is no longer '
                                       r'under .* --other_dataset'):
    evaluate_checkpoint(config, str(tmp_path / 'run'), num_batches=1)


@pytest.mark.parametrize('family,keeps_all', [('transformer', True), ('sliding', False), ('yoco', True),
                                               ('goldfinch', True)])
@pytest.mark.fault('a decode cache written past its max_len through the model API (two calls of 5 tokens into a cache '
                   'for 8): a global KV cache, YOCO\'s shared K/V, GOLD\'s key cache; a window ring',
                   'ModelCache.overflowed() is True where a cache keeps every token (its attention would silently '
                   'lose the oldest ones), False while it fits and for a ring of the window')
def test_a_cache_written_past_max_len_says_so(family, keeps_all, data_dir):
  config = family_tiny_config(family, data_dir).model
  if family == 'sliding':
    config.window = 4  # a ring of 4 slots (a window over 8 keeps all 8 tokens: it would overflow too)
  model = architectures.create_model(config.to_dict(), nnx.Rngs(0))
  step = jitted(model)
  tokens, positions = random_tokens((2, 5), 64), jnp.tile(jnp.arange(5), (2, 1))
  _, cache = step(tokens, positions, model.init_cache(2, 8, jnp.float32))
  assert not cache.overflowed()
  _, cache = step(tokens, positions + 5, cache)
  assert bool(cache.overflowed()) == keeps_all


@pytest.mark.fault('a text corpus with Latin-1, binary and empty files',
                   'bytes are trained on as they are (byte tokens); nothing crashes; empty files are skipped; the '
                   'build warns how many documents are mostly not UTF-8 text, naming them')
def test_non_utf8_and_binary_files_are_bytes(tmp_path, caplog):
  from trainers import data
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  (corpus / 'latin1.txt').write_bytes('café naïve'.encode('latin-1') * 50)
  (corpus / 'binary.txt').write_bytes(bytes(range(256)) * 8)
  (corpus / 'empty.txt').write_bytes(b'')
  (corpus / 'utf8.md').write_text('日本語のテキスト ' * 40)
  config = tiny_experiment(tmp_path / 'tfds', **{'dataset.name': 'local_text', 'dataset.path': str(corpus),
                                                'dataset.validation_fraction': 0.3})
  batch = next(data.make_train_iterator(config))
  assert batch['tokens'].shape == (8, 33) and batch['tokens'].max() <= 256
  assert f'{corpus}: 1 of 3 documents are mostly not UTF-8 text (binary files?), e.g. binary.txt' in caplog.text
  assert set(np.unique(batch['tokens'])) - set(range(257)) == set()


@pytest.mark.parametrize('path', ['missing', 'empty'])
@pytest.mark.fault('config.dataset.path missing, or a directory with no matching files',
                   'ValueError naming config.dataset.path (and the patterns) before anything is built')
def test_missing_or_empty_data_directory(tmp_path, path):
  from trainers import data
  directory = tmp_path / path
  if path == 'empty':
    directory.mkdir()
  config = tiny_experiment(tmp_path / 'tfds', **{'dataset.name': 'local_text', 'dataset.path': str(directory)})
  with pytest.raises(ValueError, match=r'config\.dataset\.path'):
    data.make_train_iterator(config)


@pytest.mark.fault('a tfds catalog dataset that is not prepared offline (pg19)',
                   'DatasetNotPreparedError naming the dataset, the data_dir and how to prepare it')
def test_unavailable_dataset_says_how_to_get_it(tmp_path):
  from trainers import data
  config = tiny_experiment(tmp_path / 'tfds', **{'dataset.name': 'pg19'})
  with pytest.raises(data.DatasetNotPreparedError, match=r"pg19.*tfds build pg19"):
    data.make_train_iterator(config)


def with_flags(base: list[str], **fields) -> list[str]:
  """`base` with --config.<field>=<value> overrides replaced or added."""
  return [arg for arg in base if not any(arg.startswith(f'--config.{f}=') for f in fields)] + [
      f'--config.{field}={value}' for field, value in fields.items()]


@pytest.mark.fault('a second trainer started on a workdir that a running trainer holds',
                   'exits at once with one line naming the holder (host, pid, since when); writes nothing')
def test_second_trainer_is_refused_naming_the_holder(tmp_path, data_dir):
  with workdir_lock.hold(tmp_path):  # this process is the running trainer
    holder = json.loads((tmp_path / 'lock').read_text())
    second = subprocess.run(command(tmp_path, data_dir, 'packed'), cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120)
    assert second.returncode != 0
    assert second.stderr.strip().splitlines()[-1].endswith(
        f'{tmp_path} is in use by another trainer (host {socket.gethostname()}, pid {os.getpid()}, since '
        f'{holder["started"]}); wait for it to end, or if it no longer runs (on another host), pass --force_unlock '
        f'(or remove {tmp_path / "lock"})')
    assert [p.name for p in tmp_path.iterdir()] == ['lock']
  assert not (tmp_path / 'lock').exists()


@pytest.mark.fault('a lock left by a killed trainer (its pid no longer runs on this host); a lock of a trainer on '
                   'another host; SIGTERM to a trainer before its step loop',
                   "the dead trainer's lock is taken over with a warning naming it; another host's is refused "
                   'naming host, pid and since when until --force_unlock; SIGTERM exits, releasing the lock')
def test_stale_lock_is_taken_over_and_another_hosts_needs_force(tmp_path, data_dir, caplog):
  dead = int(subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                            text=True, check=True).stdout)
  lock = tmp_path / 'lock'
  lock.write_text(json.dumps(dict(host=socket.gethostname(), pid=dead, started='2020-01-01T00:00:00+00:00')))
  with workdir_lock.hold(tmp_path):
    assert json.loads(lock.read_text())['pid'] == os.getpid()
  assert f'no longer runs (host {socket.gethostname()}, pid {dead}, since 2020-01-01' in caplog.text
  assert not lock.exists()
  lock.write_text(json.dumps(dict(host='elsewhere', pid=4242, started='2020-01-01T00:00:00+00:00')))
  refused = r'in use by another trainer \(host elsewhere, pid 4242, since 2020-01-01T00:00:00\+00:00\).* --force_unlock'
  with pytest.raises(workdir_lock.WorkdirLockedError, match=refused):
    train(tiny_experiment(data_dir), str(tmp_path))
  assert [p.name for p in tmp_path.iterdir()] == ['lock']
  with pytest.raises(SystemExit) as exit_info, workdir_lock.hold(tmp_path, force=True):
    assert json.loads(lock.read_text())['pid'] == os.getpid()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler interrupts this
  assert exit_info.value.code == 128 + signal.SIGTERM and not lock.exists()


def test_reliability_doc_lists_every_fault(request):
  with open(os.path.join(REPO, 'docs', 'reliability.md')) as f:
    doc = f.read()
  faults = {m.args[0] for item in request.session.items for m in item.iter_markers('fault')}
  missing = [fault for fault in faults if fault not in doc]
  assert not missing, f'docs/reliability.md is stale; regenerate it (see its first lines). Missing: {missing}'
