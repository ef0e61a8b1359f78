"""Orbax checkpoints of the train state together with the data iterator state.

Each checkpoint step holds two items: `state` (the sharded TrainState,
restored directly onto the target shardings) and `data` (the loader's
position as JSON), so a resumed run sees exactly the batches it would have
seen. Saves are asynchronous and atomic (orbax writes to a temporary folder
and renames it when complete), and only the last `keep` are kept.
"""
import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Saves if `step` is on the save interval (or `force`); returns whether it saved."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores the state onto the shardings of `abstract_state` (ShapeDtypeStructs)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
