"""Orbax checkpoints of the train state with the data position and checksums.

Each checkpoint step holds two items: `state` (the sharded TrainState,
restored directly onto the target shardings) and `meta` (JSON: the data
loader's position, so a resumed run sees exactly the batches it would have
seen, and one checksum per state leaf). Saves are asynchronous and atomic
(orbax writes into a temporary folder and renames it when complete; on an
object store a commit file marks it complete), and only the last `keep` are
kept.

Restoring walks back from the newest step: a checkpoint that fails to load
(truncated, missing files) or whose arrays do not match their checksums
(edited) or that holds NaN/Inf is reported by step, renamed to `<step>.corrupt`
and skipped. If checkpoints exist but none is usable, restoring raises rather
than silently starting from scratch over existing work (and `set_aside()`
lists them for the next start, which refuses too: trainers/training/run_history.py). A
checkpoint that is intact but of another state layout (a changed model or
optimizer config) is not corruption: it raises StateMismatchError and nothing
is renamed.

No checkpoint is written whose parameters or optimizer state are not finite:
`save` checks them on the devices first (in the same jitted pass as the
checksums) and raises NonFiniteError instead; `last_good` is the newest step
this process saved or restored, verified finite either way.

The directory is an etils.epath (local or gs://). `read_checkpoint` (evaluate,
sample) reads through a read-only manager that never creates, renames or
deletes anything, so it can run beside a training run; it reads the newest
finished checkpoint (orbax ignores one still being written).
"""
import re
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from trainers import paths


class CorruptCheckpointError(RuntimeError):
  """A checkpoint cannot be read back as it was written."""


class StateMismatchError(ValueError):
  """A checkpoint is intact but holds a state of another shape (the model or optimizer config changed)."""


class NonFiniteError(FloatingPointError):
  """The train state holds NaN/Inf (a loss, gradient, parameter or optimizer moment); it is never saved."""


def state_structure(state: Any) -> list[list]:
  """[path, shape, dtype] of every leaf: what a checkpoint must match to be restored into `state`."""
  return [[jax.tree_util.keystr(path), list(leaf.shape), str(leaf.dtype)]
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]]


@jax.jit
def state_summary(state: Any) -> tuple[list[jax.Array], jax.Array]:
  """One uint32 checksum per leaf (the sum of its bits weighted by (2 * flat index + 1), mod 2^32), and whether
  every parameter and optimizer-state value is finite: one pass over the state on its devices."""
  def checksum(x):
    bits = (jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
            if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.uint32))
    weights = 2 * jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) if x.ndim else jnp.uint32(0)
    for axis in range(1, x.ndim):
      weights = weights * x.shape[axis] + 2 * jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    return jnp.sum(bits * (weights + 1), dtype=jnp.uint32)
  finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return [checksum(x) for x in jax.tree.leaves(state)], jnp.all(jnp.stack(finite))


def _summary(state: Any) -> tuple[list[int], bool]:
  checksums, finite = jax.device_get(state_summary(state))
  return [int(c) for c in checksums], bool(finite)


class Checkpointer:
  """The train state's checkpoints in `directory` (an epath: local or gs://). `read_only` (evaluate, sample)
  never creates, renames or deletes anything: an unusable checkpoint is only skipped."""

  def __init__(self, directory: str | epath.Path, *, save_every: int = 1, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = paths.as_path(directory)
    self.read_only = read_only
    self.last_good: int | None = None  # the newest step this process saved or restored, verified finite
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    else:
      options = ocp.CheckpointManagerOptions(
          save_interval_steps=save_every, enable_async_checkpointing=async_save,
          preservation_policy=ocp.checkpoint_managers.LatestN(keep), create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` would write a checkpoint without `force`."""
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Saves if `step` is on the save interval (or `force`); returns whether it saved. Raises NonFiniteError,
    saving nothing, if a parameter or optimizer-state value is not finite."""
    if not (force or self.due(step)):
      return False
    checksums, finite = _summary(state)
    if not finite:
      raise NonFiniteError(
          f'the parameters or optimizer state hold NaN/Inf at step {step}; not saved (the last checkpoint '
          f'verified finite is {self.last_good_text()}). Lower config.optimizer.learning_rate or check the data.')
    meta = dict(data=data_state, checksums=checksums, structure=state_structure(state))
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    if saved:
      self.last_good = step
    return saved

  def last_good_text(self) -> str:
    return 'none: no checkpoint of this run' if self.last_good is None else f'step {self.last_good}'

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores step onto the shardings of `abstract_state`.

    Raises StateMismatchError if the checkpoint holds a differently shaped
    state, CorruptCheckpointError if it cannot be read, was altered, or holds
    non-finite values.
    """
    step_dir = self.directory / str(step)
    if (step_dir / 'state').is_dir() and not (step_dir / 'meta').is_dir():
      raise StateMismatchError(f'the checkpoint of step {step} in {self.directory} has no `meta` item: it was '
                               'written by an older version of this code, which cannot resume it')
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
      saved_structure = meta['structure']
    except Exception as error:  # noqa: BLE001 (any failure to read is corruption)
      raise CorruptCheckpointError(f'its metadata cannot be read: {type(error).__name__}: {error}') from error
    expected = state_structure(abstract_state)
    if saved_structure != expected:
      differences = [f'{a} vs {b}' for a, b in zip(saved_structure, expected) if a != b][:3]
      raise StateMismatchError(
          f'the checkpoint of step {step} in {self.directory} holds {len(saved_structure)} arrays, this config '
          f'expects {len(expected)}; first differences (saved vs now): {differences}. The model or optimizer '
          'config differs from the one that wrote it.')
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))['state']
    except Exception as error:  # noqa: BLE001
      raise CorruptCheckpointError(f'its arrays cannot be read: {type(error).__name__}: {error}') from error
    checksums, finite = _summary(state)
    names = [name for name, _, _ in expected]
    bad = [name for name, got, want in zip(names, checksums, meta['checksums']) if got != want]
    if bad:
      raise CorruptCheckpointError(f'arrays do not match their checksums: {bad[:5]}')
    if not finite:
      raise CorruptCheckpointError('its parameters or optimizer state hold NaN/Inf')
    self.last_good = step if self.last_good is None else max(self.last_good, step)
    return state, meta['data']

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data position) of the newest usable checkpoint; None if there is no checkpoint."""
    failures, failed_steps = [], []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, abstract_state)
      except CorruptCheckpointError as error:
        if self.read_only and not (self.directory / str(step)).exists():
          logging.info('checkpoint of step %d in %s was deleted while being read (a trainer keeps the last ones); '
                       'trying the one before', step, self.directory)
          continue
        failures.append(f'step {step}: {type(error).__name__}: {error}'[:500])
        failed_steps.append(str(step))
        logging.error('checkpoint of step %d in %s is unusable (%s); %s and trying the one before', step,
                      self.directory, failures[-1],
                      'skipped' if self.read_only else f'set aside as {self._quarantine(step)}')
        continue
      return step, state, data_state
    if failures and self.read_only:
      raise CorruptCheckpointError(
          f'no usable checkpoint in {self.directory}: steps {", ".join(failed_steps)} '
          'cannot be read (see the log); left as they are. Train a new model there with '
          '`python -m experiments.train --restart`, or use another --workdir.')
    if failures:
      raise CorruptCheckpointError(
          f'no usable checkpoint in {self.directory}; refusing to start from scratch over existing work. '
          f'Failures: {failures}. To train a new model here, pass --restart to experiments.train (the earlier '
          'run is kept under earlier_runs/), or use another --workdir.')
    return None

  def set_aside(self) -> list[str]:
    """The step folders that restores set aside as corrupt (`<step>.corrupt`, `<step>.corrupt2`, ...)."""
    if not self.directory.is_dir():
      return []
    return sorted(p.name for p in self.directory.iterdir() if re.fullmatch(r'\d+\.corrupt\d*', p.name))

  def _quarantine(self, step: int) -> epath.Path:
    """Renames a bad step folder out of orbax's view (keeping it for inspection)."""
    source = self.directory / str(step)
    target = self.directory / f'{step}.corrupt'
    suffix = 1
    while target.exists():
      suffix += 1
      target = self.directory / f'{step}.corrupt{suffix}'
    if jax.process_index() == 0:
      source.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'quarantined checkpoint {step}')
    self.manager.reload()
    return target

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def read_checkpoint(workdir: str | epath.Path, abstract_state: Any,
                    step: int | None = None) -> tuple[int, Any, dict]:
  """(step, state, data position) of checkpoint `step` of `workdir` (default: the newest usable one) for evaluate
  and sample:
  nothing in the workdir is created, renamed or deleted, so it is safe beside a running trainer. Raises
  FileNotFoundError if there is no such checkpoint, CorruptCheckpointError if none is usable."""
  directory = paths.as_path(workdir) / 'checkpoints'
  checkpointer = Checkpointer(directory, read_only=True) if directory.is_dir() else None
  steps = [] if checkpointer is None else list(checkpointer.manager.all_steps())
  try:
    if step is None and steps:
      restored = checkpointer.restore_latest(abstract_state)
      if restored is not None:
        return restored
    if step is not None and step in steps:
      return step, *checkpointer.restore(step, abstract_state)
    set_aside = checkpointer.set_aside() if checkpointer else []
    if step is None and set_aside:
      raise CorruptCheckpointError(
          f'no usable checkpoint in {directory}: {", ".join(set_aside)} were set aside as corrupt by an earlier '
          'start. Train a new model there with `python -m experiments.train --restart`, or use another --workdir.')
    raise FileNotFoundError(f'no checkpoint {"" if step is None else f"of step {step} "}under {directory}'
                            f'{f" (it has steps {steps})" if steps else ""}; train first')
  finally:
    if checkpointer is not None:
      checkpointer.close()
