"""The jitted train and eval steps: next-token cross-entropy on packed rows.

A batch holds rows of seq_len + 1 tokens and their positions; inputs are
tokens[:, :-1], targets tokens[:, 1:]. A target counts when its position is
> 0: it is neither padding (-1) nor the first token of a document, which no
earlier token of its row may predict. The loss is the mean over counted
targets of the whole batch, also with gradient accumulation (micro-batches
sum their losses and counts, then one division).
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from trainers.tokenizer import ByteTokenizer
from trainers.train_state import TrainState

Batch = dict[str, jax.Array]


def split_batch(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """tokens/positions [B, L+1] -> inputs, input positions, targets, target weights [B, L]."""
  tokens, positions = batch['tokens'], batch['positions']
  return tokens[:, :-1], positions[:, :-1], tokens[:, 1:], (positions[:, 1:] > 0).astype(jnp.float32)


def loss_sums(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch) -> tuple[jax.Array, dict]:
  """Summed cross-entropy (nats) over counted targets, and the sums the metrics need."""
  inputs, positions, targets, weights = split_batch(batch)
  logits, _ = nnx.merge(graphdef, params)(inputs, positions)  # [B, L, V] float32
  nats = optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights
  byte_weights = weights * (targets < ByteTokenizer.eos_id)
  total = jnp.sum(nats)
  return total, dict(loss_sum=total, target_count=jnp.sum(weights), byte_count=jnp.sum(byte_weights))


def _accumulated_grads(graphdef, params, batch: Batch, micro_batches: int):
  grad_fn = jax.grad(lambda p, b: loss_sums(graphdef, p, b), has_aux=True)
  if micro_batches == 1:
    return grad_fn(params, batch)
  micro = jax.tree.map(lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), batch)

  def add(carry, micro_batch):
    grads, sums = grad_fn(params, micro_batch)
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  zeros = jax.tree.map(jnp.zeros_like, params), dict(loss_sum=0.0, target_count=0.0, byte_count=0.0)
  zeros = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), zeros)
  return jax.lax.scan(add, zeros, micro)[0]


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, micro_batches: int = 1) -> Callable:
  """(state, batch) -> (state, metrics); one optimizer update per call."""
  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    grad_sums, sums = _accumulated_grads(graphdef, state.params, batch, micro_batches)
    count = jnp.maximum(sums['target_count'], 1.0)
    grads = jax.tree.map(lambda g: g / count, grad_sums)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=sums['loss_sum'] / count, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state.step), target_count=sums['target_count'])
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
  return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
  """(params, batch) -> dict of sums (loss_sum, target_count, byte_count)."""
  def eval_step(params: nnx.State, batch: Batch) -> dict:
    return loss_sums(graphdef, params, batch)[1]
  return eval_step
