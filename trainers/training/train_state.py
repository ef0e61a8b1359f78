"""The train state (step, parameters, optimizer state), created sharded on the mesh.

Parameters are created inside one `jax.jit` whose out_shardings come from the
logical axis names, so no device ever holds the whole unsharded model. In
long-document streaming mode the state also holds the model cache that each
step hands to the next (checkpointed with it, so a resume is exact).
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
  step: jax.Array           # int32 []: batches consumed (updates applied + skipped)
  params: nnx.State
  opt_state: optax.OptState
  first_nonfinite: jax.Array  # int32 [2]: (step, leaf) of the first non-finite loss/gradient, -1 if none
  skipped_steps: jax.Array    # int32 []: steps whose update was dropped for non-finite values
  carry: Any = None           # long-document streaming: the model cache carried to the next step


def model_graphdef(config: ConfigDict) -> tuple[nnx.GraphDef, architectures.base.SequenceModel]:
  """The model's static structure and an abstract (shape-only) model, without allocating."""
  abstract_model = nnx.eval_shape(lambda: architectures.create_model(config.model.to_dict(), nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract_model, nnx.Param)
  return graphdef, abstract_model


def streaming(config: ConfigDict) -> bool:
  return bool(config.get('streaming') and config.streaming.enabled)


def carry_memory(config: ConfigDict) -> int:
  """Tokens the carried cache holds (its max_len): config.streaming.memory, default seq_len."""
  return config.streaming.memory or config.seq_len


def new_carry(model: architectures.base.SequenceModel, config: ConfigDict, batch: int) -> Any:
  return model.init_cache(batch, carry_memory(config), jnp.dtype(config.model.dtype))


def init_fn(config: ConfigDict, tx: optax.GradientTransformation):
  """A function of no arguments returning a freshly initialised TrainState."""
  def create() -> TrainState:
    model = architectures.create_model(config.model.to_dict(), nnx.Rngs(config.seed))
    _, params = nnx.split(model, nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      first_nonfinite=jnp.full((2,), -1, jnp.int32), skipped_steps=jnp.zeros((), jnp.int32),
                      carry=new_carry(model, config, config.batch_size) if streaming(config) else None)
  return create


def create_sharded(create, shardings: Any) -> TrainState:
  return jax.jit(create, out_shardings=shardings)()


def param_count(params: nnx.State) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
