"""The training loop shared by every family.

validate config -> workdir lock -> mesh -> sharded train state (fresh, or
restored with the data position from the last checkpoint) -> jitted, donated
train step over the data -> metrics, evaluation and checkpoints on their
intervals. SIGTERM (preemption) finishes the current step, writes a checkpoint
and returns. The workdir is an etils.epath (local or gs://), held by one
trainer at a time (trainers/training/workdir_lock.py).
"""
import signal
import threading

import jax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from trainers import data, paths, run_config
from trainers.checkpoints import Checkpointer, NonFiniteError
from trainers.experiment import Experiment
from trainers.logs import compiling
from trainers.training import run_history, steps, train_state, workdir_lock
from trainers.training.evaluator import Evaluator
from trainers.training.jitted_step import TrainStep
from trainers.training.metrics import MetricsWriter, Throughput, log_progress
from trainers.training.param_overview import parameter_overview


class _Preemption:
  """Whether to save and stop after this step because of SIGTERM (preemption).

  One process: a SIGTERM handler sets a flag. Several processes: JAX's
  preemption service (started by jax.distributed) hears the SIGTERM and
  agrees on one step at which every process saves, without a per-step sync.
  """

  def __init__(self):
    self.requested = threading.Event()
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.requested.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested.is_set()


def _restore_or_init(exp: Experiment, checkpointer: Checkpointer, iterator,
                     workdir: epath.Path) -> train_state.TrainState:
  """The last usable checkpoint's state (and data position), or a new model if there is none (and no earlier
  run's history would be started over; see run_history.before_fresh_start)."""
  restored = checkpointer.restore_latest(exp.restore_target())
  if restored is None:
    run_history.before_fresh_start(workdir, checkpointer.set_aside())
    logging.info('initialised a new model')
    return exp.new_state()
  step, state, data_state = restored
  iterator.set_state(data_state)
  logging.info('resumed from the checkpoint of step %d', step)
  return state


def _check_finite(state: train_state.TrainState, leaf_names: list[str], checkpointer: Checkpointer) -> None:
  """Raises NonFiniteError naming the first non-finite step and leaf (one scalar pair from the device)."""
  step, leaf = (int(x) for x in jax.device_get(state.first_nonfinite))
  if step >= 0:
    raise NonFiniteError(
        f'non-finite {leaf_names[leaf]} at step {step + 1}; stopping without saving (the last checkpoint verified '
        f'finite is {checkpointer.last_good_text()}). Set config.on_nonfinite="skip" to drop such steps instead.')


def train(config: ConfigDict, workdir: str | epath.Path, *, stop_at: int | None = None, restart: bool = False,
          force_unlock: bool = False) -> dict:
  """Trains `config` in `workdir`, resuming from its last checkpoint; returns the last logged metrics.

  `stop_at` ends this call early at that step with a checkpoint (the schedule
  still runs to config.total_steps); a later call continues from there.
  `restart` starts a new run, moving the workdir's earlier run (if any) to
  `earlier_runs/<k>/` (see trainers/training/run_history.py). A workdir this call
  created is removed again if it fails before writing a checkpoint or a metric.
  Raises WorkdirLockedError if another trainer holds the workdir (`force_unlock`
  takes its lock over: for a holder on another host that is known to be gone).
  """
  exp = Experiment.build(config)  # a wrong config fails before the workdir is touched
  workdir = paths.as_path(workdir)
  created = not workdir.exists()
  with workdir_lock.hold(workdir, force=force_unlock):
    try:
      return _train(exp, workdir, stop_at, restart)
    except BaseException:
      if created:
        run_history.remove_if_unused(workdir)
      raise


def _train(exp: Experiment, workdir: epath.Path, stop_at: int | None, restart: bool) -> dict:
  config = exp.config
  if restart:
    run_history.set_aside_earlier_run(workdir)
  run_config.record_or_check(config, workdir)
  checkpointer = Checkpointer(workdir / 'checkpoints', save_every=config.checkpoint_every,
                              keep=config.get('keep_checkpoints', 3))
  iterator = writer = None
  try:
    iterator = data.make_train_iterator(config, process_index=jax.process_index(),
                                        process_count=jax.process_count())
    if jax.process_index() == 0:
      logging.info('data: %s', data.summarize(data.describe(config)))
    with exp.activate():
      state = _restore_or_init(exp, checkpointer, iterator, workdir)
      writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)  # after an earlier run's files moved
      return _Loop(config, exp, checkpointer, iterator, writer, workdir).run(state, stop_at)
  finally:
    for closable in (iterator, writer, checkpointer):
      if closable is not None:
        closable.close()


class _Loop:
  """The step loop: train, log, evaluate, check, checkpoint; one instance per `train` call."""

  def __init__(self, config: ConfigDict, exp: Experiment, checkpointer: Checkpointer, iterator,
               writer: MetricsWriter, workdir: epath.Path):
    self.config, self.exp, self.checkpointer, self.iterator, self.writer = config, exp, checkpointer, iterator, writer
    self.workdir = workdir
    self.is_lead = jax.process_index() == 0
    self.stop_on_nonfinite = config.get('on_nonfinite', 'stop') == 'stop'
    self.train_step = TrainStep(exp)
    self.evaluator = Evaluator(config, exp.graphdef, exp.batch_sharding, num_batches=config.get('eval_batches', None))
    self.throughput = Throughput(train_flops_per_token=3 * exp.abstract_model.flops_per_token(config.seq_len),
                                 tokens_per_step=config.batch_size * config.seq_len,
                                 total_steps=config.total_steps, devices=list(exp.mesh.devices.flat))
    self.profile_steps = set(config.get('profile_steps', ()))

  def run(self, state: train_state.TrainState, stop_at: int | None) -> dict:
    config = self.config
    step = first_step = int(jax.device_get(state.step))
    self.writer.drop_records_after(step)
    self.leaf_names = steps.leaf_names(state.params)
    if self.is_lead:
      logging.info('parameters (%s, %d total):\n%s', config.model.name,
                   train_state.param_count(state.params), parameter_overview(state.params))
    if step >= config.total_steps:
      logging.info('already trained to config.total_steps=%d; raise it to train further', config.total_steps)
    last = {}
    leaves = self.train_step.leaves(state)  # the state between steps; see trainers/training/jitted_step.py
    with _Preemption() as preemption:
      while step < config.total_steps:
        if step == first_step:  # the first call compiles
          with compiling('the train step'):
            leaves, metrics = self._step(leaves, step)
            jax.block_until_ready(leaves)
          self.throughput.start(step + 1)  # tokens/s counts from the end of the compile
        else:
          leaves, metrics = self._step(leaves, step)
        step += 1
        last = self._log_and_evaluate(step, leaves, metrics) or last
        preempted = preemption.reached(step)
        stopping = preempted or step in (stop_at, config.total_steps)
        if stopping or self.checkpointer.due(step):
          state = self.train_step.state(leaves)
          if self.stop_on_nonfinite:
            _check_finite(state, self.leaf_names, self.checkpointer)  # never save a bad state over a good one
          self.checkpointer.save(step, state, self.iterator.get_state(), force=stopping)
        if preempted:
          logging.warning('SIGTERM: saved the checkpoint of step %d; exiting', step)
        if stopping:
          break
    return last

  def _step(self, leaves: list[jax.Array], step: int):
    profiling = step in self.profile_steps
    if profiling:
      jax.profiler.start_trace(str(self.workdir / 'profile'))
    leaves, metrics = self.train_step(leaves, self.exp.device_batch(next(self.iterator)))
    if profiling:
      jax.block_until_ready(leaves)
      jax.profiler.stop_trace()
    return leaves, metrics

  def _log_and_evaluate(self, step: int, leaves: list[jax.Array], metrics: dict) -> dict:
    """Writes the record of this step (empty if it is neither a log nor an eval step)."""
    config, record = self.config, {}
    if step % config.log_every == 0 or step in (1, config.total_steps):  # step 1: the loss at the start
      record.update({k: float(v) for k, v in jax.device_get(metrics).items()})
      record.update(self.throughput.measure(step))
      if self.stop_on_nonfinite and record['skipped_steps']:
        _check_finite(self.train_step.state(leaves), self.leaf_names, self.checkpointer)
      if self.is_lead:
        log_progress(step, config.total_steps, record)
    if step % config.eval_every == 0 or step == config.total_steps:
      record.update({f'eval_{k}': v for k, v in self.evaluator.scalars(self.train_step.state(leaves).params).items()})
      if self.is_lead:
        logging.info('step %d eval: %s', step, ', '.join(f'{k[5:]} {v:.4f}' for k, v in record.items()
                                                         if k in ('eval_loss', 'eval_bits_per_byte', 'eval_mae')))
      self.throughput.start(step)  # evaluation time is not training time
    if record:
      self.writer.write(step, record)
    return record
