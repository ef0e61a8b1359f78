"""The train state (step, parameters, optimizer state), created sharded on the mesh.

Parameters are created inside one `jax.jit` whose out_shardings come from the
logical axis names, so no device ever holds the whole unsharded model.
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from ml_collections import ConfigDict

import architectures


@flax.struct.dataclass
class TrainState:
  step: jax.Array   # int32 scalar: number of updates applied
  params: nnx.State
  opt_state: optax.OptState


def model_graphdef(config: ConfigDict) -> tuple[nnx.GraphDef, architectures.base.SequenceModel]:
  """The model's static structure and an abstract (shape-only) model, without allocating."""
  abstract_model = nnx.eval_shape(lambda: architectures.create_model(config.model.to_dict(), nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract_model, nnx.Param)
  return graphdef, abstract_model


def init_fn(config: ConfigDict, tx: optax.GradientTransformation):
  """A function of no arguments returning a freshly initialised TrainState."""
  def create() -> TrainState:
    model = architectures.create_model(config.model.to_dict(), nnx.Rngs(config.seed))
    _, params = nnx.split(model, nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return create


def create_sharded(create, shardings: Any) -> TrainState:
  return jax.jit(create, out_shardings=shardings)()


def param_count(params: nnx.State) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
