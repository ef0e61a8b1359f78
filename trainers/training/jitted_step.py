"""The experiment's sharded, donated train step, jitted over the train state's flat list of arrays.

A TrainState holds its parameters and AdamW moments as nnx Variables: pytree
nodes that jax flattens and rebuilds in Python on every call. At 184M
parameters (575 arrays) that costs host time every step (docs/performance.md,
"Flat leaves"), time in which the GPU waits whenever the host cannot run
ahead: a step timed on its own, a small model. A list of arrays takes jit's
C++ path. Callers keep the state as that list between steps and
rebuild the TrainState only when they need one (evaluation, checks,
checkpoints).
"""
from typing import Any

import jax

from trainers.experiment import Experiment
from trainers.training import steps
from trainers.training.train_state import TrainState


class TrainStep:
  """step(leaves, batch) -> (leaves, metrics); `leaves(state)` and `state(leaves)` convert."""

  def __init__(self, exp: Experiment):
    self.treedef = jax.tree.structure(exp.abstract_state)
    shardings = jax.tree.leaves(exp.state_shardings)
    train_step = steps.make_train_step(exp.graphdef, exp.tx, exp.schedule, exp.config.get('grad_accum_steps', 1))

    def on_leaves(leaves: list[jax.Array], batch: steps.Batch) -> tuple[list[jax.Array], dict]:
      state, metrics = train_step(self.state(leaves), batch)
      return self.leaves(state), metrics

    self.jitted = jax.jit(on_leaves, in_shardings=(shardings, exp.batch_sharding), out_shardings=(shardings, None),
                          donate_argnums=0)

  def __call__(self, leaves: list[jax.Array], batch: steps.Batch) -> tuple[list[jax.Array], dict]:
    return self.jitted(leaves, batch)

  def lower(self, leaves: list[Any], batch: Any) -> jax.stages.Lowered:
    return self.jitted.lower(leaves, batch)

  @staticmethod
  def leaves(state: TrainState) -> list[jax.Array]:
    return jax.tree.leaves(state)

  def state(self, leaves: list[jax.Array]) -> TrainState:
    return jax.tree.unflatten(self.treedef, leaves)
