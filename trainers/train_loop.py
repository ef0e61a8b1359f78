"""The training loop shared by every family.

validate config -> mesh -> sharded train state (fresh, or restored with the
data position from the last checkpoint) -> jitted, donated train step over
the data -> metrics, evaluation and checkpoints on their intervals. SIGTERM
(preemption) finishes the current step, writes a checkpoint and returns.
"""
import os
import signal
import threading

import jax
from absl import logging
from ml_collections import ConfigDict

from trainers import data, steps, train_state
from trainers.checkpoints import Checkpointer
from trainers.evaluator import Evaluator
from trainers.experiment import Experiment
from trainers.metrics import MetricsWriter, Throughput, log_progress
from trainers.param_overview import parameter_overview


class _Preemption:
  """Sets a flag on SIGTERM; the loop checks it between steps."""

  def __init__(self):
    self.requested = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.requested.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _restore_or_init(exp: Experiment, checkpointer: Checkpointer, iterator) -> train_state.TrainState:
  """The last checkpoint's state (and data position), or a new model if there is none."""
  step = checkpointer.latest_step()
  if step is None:
    logging.info('initialised a new model')
    return exp.new_state()
  state, data_state = checkpointer.restore(step, exp.restore_target())
  iterator.set_state(data_state)
  logging.info('resumed from the checkpoint of step %d', step)
  return state


def train(config: ConfigDict, workdir: str, *, stop_at: int | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its last checkpoint; returns the last logged metrics.

  `stop_at` ends this call early at that step with a checkpoint (the schedule
  still runs to config.total_steps); a later call continues from there.
  """
  exp = Experiment.build(config)
  is_lead = jax.process_index() == 0
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=config.checkpoint_every,
                              keep=config.get('keep_checkpoints', 3))
  iterator = data.make_train_iterator(config, process_index=jax.process_index(),
                                      process_count=jax.process_count())
  with exp.activate():
    state = _restore_or_init(exp, checkpointer, iterator)
    step = first_step = int(jax.device_get(state.step))
    if is_lead:
      logging.info('parameters (%s, %d total):\n%s', config.model.name,
                   train_state.param_count(state.params), parameter_overview(state.params))
    train_step = jax.jit(
        steps.make_train_step(exp.graphdef, exp.tx, exp.schedule, config.get('grad_accum_steps', 1)),
        in_shardings=(exp.state_shardings, exp.batch_sharding), out_shardings=(exp.state_shardings, None),
        donate_argnums=0)
    evaluator = Evaluator(config, exp.graphdef, exp.batch_sharding, num_batches=config.get('eval_batches', None))
    writer = MetricsWriter(workdir, resume_step=step, enabled=is_lead)
    throughput = Throughput(train_flops_per_token=3 * exp.abstract_model.flops_per_token(config.seq_len),
                            tokens_per_step=config.batch_size * config.seq_len,
                            total_steps=config.total_steps, devices=list(exp.mesh.devices.flat))
    profile_steps = set(config.get('profile_steps', ()))
    if step >= config.total_steps:
      logging.info('already trained to config.total_steps=%d; raise it to train further', config.total_steps)
    last = {}
    with _Preemption() as preemption:
      while step < config.total_steps:
        if step in profile_steps:
          jax.profiler.start_trace(os.path.join(workdir, 'profile'))
        state, metrics = train_step(state, exp.device_batch(next(iterator)))
        if step in profile_steps:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
        step += 1
        if step == first_step + 1:  # tokens/s counts from the end of the compile
          jax.block_until_ready(state)
          throughput.start(step)

        record = {}
        if step % config.log_every == 0 or step == config.total_steps:
          record.update({k: float(v) for k, v in jax.device_get(metrics).items()})
          record.update(throughput.measure(step))
          if is_lead:
            log_progress(step, config.total_steps, record)
        if step % config.eval_every == 0 or step == config.total_steps:
          record.update({f'eval_{k}': v for k, v in evaluator(state.params).items()})
          logging.info('step %d eval: loss %.4f, %.3f bits/byte', step, record['eval_loss'],
                       record['eval_bits_per_byte'])
          throughput.start(step)  # evaluation time is not training time
        if record:
          writer.write(step, record)
          last = record

        preempted = preemption.requested.is_set()
        stopping = preempted or step in (stop_at, config.total_steps)
        checkpointer.save(step, state, iterator.get_state(), force=stopping)
        if preempted:
          logging.warning('SIGTERM: saved the checkpoint of step %d; exiting', step)
        if stopping:
          break
  iterator.close()
  checkpointer.close()
  writer.close()
  return last
