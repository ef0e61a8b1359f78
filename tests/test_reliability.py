"""Faults injected into training: SIGKILL at random points (one during a
checkpoint write), SIGTERM, truncated and edited checkpoints, NaN/Inf, a
workdir of another model, an unknown config field, bad data. Each ends where a
careful user wants it to: a resumed run equals an uninterrupted one bitwise on
CPU (same compiled program on the same inputs), nothing good is ever
overwritten, and a mistake is named in one line."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from trainers.checkpoints import Checkpointer, CorruptCheckpointError, StateMismatchError
from trainers.experiment import Experiment
from trainers.logs import has_accelerator
from trainers.run_config import WorkdirMismatchError, record_or_check
from trainers.run_history import EarlierRunError
from trainers.train_loop import NonFiniteError, train
from tests.helpers import family_tiny_config, tiny_experiment

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


@pytest.mark.fault('a workdir whose metrics.jsonl has records but no checkpoint (a run killed before its first save)',
                   'the new start moves that history to earlier_runs/1/ with a warning; never truncates it')
def test_metrics_without_a_checkpoint_are_kept(tmp_path):
  from trainers import run_history
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
                                           r'\(the last good checkpoint is step 1\)'):
    train(config, str(tmp_path / 'stop'))
  assert sorted(int(p.name) for p in (tmp_path / 'stop' / 'checkpoints').iterdir() if p.name.isdigit()) == [1]
  config.on_nonfinite = 'skip'
  last = train(config, str(tmp_path / 'skip'))
  assert last['skipped_steps'] == 7  # every step after the first update is non-finite
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final_state(tmp_path / 'skip', data_dir, config)[1]))


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
  from trainers.metrics import MetricsWriter
  writer = MetricsWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(step, dict(loss=1.0 / step))
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 4, "lo')
  writer.drop_records_after(2)
  assert [json.loads(line)['step'] for line in open(tmp_path / 'metrics.jsonl')] == [1, 2]


@pytest.mark.fault('a text corpus with Latin-1, binary and empty files',
                   'bytes are trained on as they are (byte tokens); nothing crashes; empty files are skipped')
def test_non_utf8_and_binary_files_are_bytes(tmp_path):
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


def test_reliability_doc_lists_every_fault(request):
  with open(os.path.join(REPO, 'docs', 'reliability.md')) as f:
    doc = f.read()
  faults = {m.args[0] for item in request.session.items for m in item.iter_markers('fault')}
  missing = [fault for fault in faults if fault not in doc]
  assert not missing, f'docs/reliability.md is stale; regenerate it (see its first lines). Missing: {missing}'
