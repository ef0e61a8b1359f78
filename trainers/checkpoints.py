"""Orbax checkpoints of the train state with the data position and checksums.

Each checkpoint step holds two items: `state` (the sharded TrainState,
restored directly onto the target shardings) and `meta` (JSON: the data
loader's position, so a resumed run sees exactly the batches it would have
seen, and one checksum per state leaf). Saves are asynchronous and atomic
(orbax writes into a temporary folder and renames it when complete), and only
the last `keep` are kept.

Restoring walks back from the newest step: a checkpoint that fails to load
(truncated, missing files) or whose arrays do not match their checksums
(edited) is reported by step, renamed to `<step>.corrupt` and skipped. If
checkpoints exist but none is usable, restoring raises rather than silently
starting from scratch over existing work (and `set_aside()` lists them for the
next start, which refuses too: trainers/run_history.py). A checkpoint that is
intact but of another state layout (a changed model or optimizer config) is
not corruption: it raises StateMismatchError and nothing is renamed.
"""
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


class CorruptCheckpointError(RuntimeError):
  """A checkpoint cannot be read back as it was written."""


class StateMismatchError(ValueError):
  """A checkpoint is intact but holds a state of another shape (the model or optimizer config changed)."""


def state_structure(state: Any) -> list[list]:
  """[path, shape, dtype] of every leaf: what a checkpoint must match to be restored into `state`."""
  return [[jax.tree_util.keystr(path), list(leaf.shape), str(leaf.dtype)]
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]]


@jax.jit
def state_checksums(state: Any) -> list[jax.Array]:
  """One uint32 per leaf: the sum of its bits weighted by (2 * flat index + 1), mod 2^32."""
  def checksum(x):
    bits = (jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
            if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.uint32))
    weights = 2 * jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) if x.ndim else jnp.uint32(0)
    for axis in range(1, x.ndim):
      weights = weights * x.shape[axis] + 2 * jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    return jnp.sum(bits * (weights + 1), dtype=jnp.uint32)
  return [checksum(x) for x in jax.tree.leaves(state)]


def _checksums(state: Any) -> list[int]:
  return [int(c) for c in jax.device_get(state_checksums(state))]


class Checkpointer:

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` would write a checkpoint without `force`."""
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Saves if `step` is on the save interval (or `force`); returns whether it saved."""
    if not (force or self.due(step)):
      return False
    meta = dict(data=data_state, checksums=_checksums(state), structure=state_structure(state))
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores step onto the shardings of `abstract_state`.

    Raises StateMismatchError if the checkpoint holds a differently shaped
    state, CorruptCheckpointError if it cannot be read or was altered.
    """
    step_dir = os.path.join(self.directory, str(step))
    if os.path.isdir(os.path.join(step_dir, 'state')) and not os.path.isdir(os.path.join(step_dir, 'meta')):
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
    paths = [path for path, _, _ in expected]
    bad = [path for path, got, want in zip(paths, _checksums(state), meta['checksums']) if got != want]
    if bad:
      raise CorruptCheckpointError(f'arrays do not match their checksums: {bad[:5]}')
    return state, meta['data']

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data position) of the newest usable checkpoint; None if there is no checkpoint."""
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, abstract_state)
      except CorruptCheckpointError as error:
        failures.append(f'step {step}: {type(error).__name__}: {error}'[:500])
        logging.error('checkpoint of step %d in %s is unusable (%s); set aside as %s and trying the one before',
                      step, self.directory, failures[-1], self._quarantine(step))
        continue
      return step, state, data_state
    if failures:
      raise CorruptCheckpointError(
          f'no usable checkpoint in {self.directory}; refusing to start from scratch over existing work. '
          f'Failures: {failures}. To train a new model here, pass --restart to experiments.train (the earlier '
          'run is kept under earlier_runs/), or use another --workdir.')
    return None

  def set_aside(self) -> list[str]:
    """The step folders that restores set aside as corrupt (`<step>.corrupt`, `<step>.corrupt2`, ...)."""
    return sorted(n for n in os.listdir(self.directory) if re.fullmatch(r'\d+\.corrupt\d*', n))

  def _quarantine(self, step: int) -> str:
    """Renames a bad step folder out of orbax's view (keeping it for inspection)."""
    source = os.path.join(self.directory, str(step))
    target = f'{source}.corrupt'
    suffix = 1
    while os.path.exists(target):
      suffix += 1
      target = f'{source}.corrupt{suffix}'
    if jax.process_index() == 0:
      os.rename(source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'quarantined checkpoint {step}')
    self.manager.reload()
    return target

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
