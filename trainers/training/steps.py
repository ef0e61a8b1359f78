"""The jitted train and eval steps: next-token cross-entropy on packed rows, or
next-step squared error on a time series.

A batch holds rows of seq_len + 1 tokens (or `values` [.., F] of a series)
and their positions; inputs are rows[:, :-1], targets rows[:, 1:]. A target
counts when its position is > 0: it is neither padding (-1) nor the first
token of a document, which no earlier token of its row may predict (on a
synthetic task, only its answer tokens count). The loss is the mean over
counted targets of the whole batch (for a series: the mean squared error over
targets and features), also with gradient accumulation (micro-batches sum
their losses and counts, then one division).
"""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from trainers.training.cross_entropy import cross_entropy
from trainers.training.train_state import TrainState

Batch = dict[str, jax.Array]


def split_batch(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """tokens (or values)/positions [B, L+1] -> inputs, input positions, targets, target weights [B, L].

  On a synthetic task (the batch has an `answer` mask) only answer tokens count.
  """
  rows, positions = batch['values'] if 'values' in batch else batch['tokens'], batch['positions']
  weights = positions[:, 1:] > 0
  if 'answer' in batch:
    weights &= batch['answer'][:, 1:]
  return rows[:, :-1], positions[:, :-1], rows[:, 1:], weights.astype(jnp.float32)


def _forward(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, carry: Any = None):
  """outputs [B, L, V or F], loss per target [B, L] (0 where not counted), the sums, the new carry.

  Token logits come before the model's soft cap, which the cross-entropy applies (one pass over them).
  """
  inputs, positions, targets, weights = split_batch(batch)
  model = nnx.merge(graphdef, params)
  outputs, carry = model(inputs, positions, carry, capped=False)  # float32
  if 'values' in batch:  # forecasting: squared and absolute error, averaged over the features
    error = outputs - targets
    losses = jnp.mean(jnp.square(error), axis=-1) * weights
    sums = dict(loss_sum=jnp.sum(losses), target_count=jnp.sum(weights),
                abs_error_sum=jnp.sum(jnp.mean(jnp.abs(error), axis=-1) * weights))
  else:
    losses = cross_entropy(outputs, targets, model.logits_soft_cap) * weights
    sums = dict(loss_sum=jnp.sum(losses), target_count=jnp.sum(weights))
  return outputs, losses, sums, carry


def loss_sums(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch,
              carry: Any = None) -> tuple[jax.Array, tuple[dict, Any]]:
  """Summed cross-entropy (nats) over counted targets; aux: the sums the metrics need, and the
  model cache after this batch when a carried cache (long-document streaming) is given."""
  _, _, sums, carry = _forward(graphdef, params, batch, carry)
  return sums['loss_sum'], (sums, carry)


def _accumulated_grads(graphdef, params, batch: Batch, micro_batches: int, carry: Any):
  """(summed gradients, (sums, new carry)); micro-batches are summed in a scan (no carry then)."""
  grad_fn = jax.grad(lambda p, b, c: loss_sums(graphdef, p, b, c), has_aux=True)
  if micro_batches == 1:
    return grad_fn(params, batch, carry)
  micro = jax.tree.map(lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), batch)

  def add(total, micro_batch):
    grads, (sums, _) = grad_fn(params, micro_batch, None)
    return jax.tree.map(jnp.add, total, (grads, sums)), None

  shapes = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), None))
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (shapes[0], shapes[1][0]))
  grads, sums = jax.lax.scan(add, zeros, micro)[0]
  return grads, (sums, None)


def finite_leaves(loss: jax.Array, grads) -> jax.Array:
  """bool [1 + number of gradient leaves]: is the loss, then each gradient leaf, finite.

  A leaf counts as finite when its sum of squares is: all its entries are finite
  and its norm is below float32's ~1.8e19. These are the sums the global norm
  (clipping, the grad_norm metric) is made of, so XLA computes them once: no
  second reduction over every leaf.
  """
  return jnp.isfinite(jnp.stack([loss] + [jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)]))


def leaf_names(params) -> list[str]:
  """Names matching finite_leaves' entries: 'loss', then each gradient leaf's path."""
  return ['loss'] + ['grad' + jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, micro_batches: int = 1) -> Callable:
  """(state, batch) -> (state, metrics); one optimizer update per call.

  A step whose loss or gradients are not finite leaves parameters and
  optimizer state as they were, counts itself in `skipped_steps` and, if it is
  the first, records (step, first non-finite leaf) in `first_nonfinite`; the
  loop decides, at its next sync point, whether to stop or carry on. With a
  carried cache in the state, the model continues from it and the new cache
  is handed to the next step (no gradient flows between steps).
  """
  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    grad_sums, (sums, carry) = _accumulated_grads(graphdef, state.params, batch, micro_batches, state.carry)
    count = jnp.maximum(sums['target_count'], 1.0)
    grads = jax.tree.map(lambda g: g / count, grad_sums)
    loss = sums['loss_sum'] / count
    finite = finite_leaves(loss, grads)
    ok = jnp.all(finite)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    first_bad = jnp.stack([state.step, jnp.argmin(finite).astype(jnp.int32)])
    new_state = TrainState(
        step=state.step + 1, params=keep_if_bad(params, state.params),
        opt_state=keep_if_bad(opt_state, state.opt_state),
        first_nonfinite=jnp.where(ok | (state.first_nonfinite[0] >= 0), state.first_nonfinite, first_bad),
        skipped_steps=state.skipped_steps + (~ok).astype(jnp.int32),
        carry=keep_if_bad(carry, state.carry))
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step),
                   target_count=sums['target_count'], skipped_steps=new_state.skipped_steps)
    return new_state, metrics
  return train_step


def context_lengths(positions: jax.Array) -> jax.Array:
  """positions [B, L+1] -> [B, L]: how many tokens of its document each target sees in the row.

  A target at row index t + 1 sees its document's earlier tokens in the row:
  all `position` of them if the document starts in the row, else t + 1.
  """
  return jnp.minimum(positions[:, 1:], jnp.arange(1, positions.shape[1], dtype=positions.dtype))


def position_bucket(context: jax.Array, num_buckets: int) -> jax.Array:
  """Bucket b holds context lengths [2^b, 2^(b+1)) (the last bucket: everything beyond)."""
  return jnp.clip(jnp.floor(jnp.log2(jnp.maximum(context, 1))).astype(jnp.int32), 0, num_buckets - 1)


def make_eval_step(graphdef: nnx.GraphDef, num_buckets: int = 24) -> Callable:
  """(params, batch) -> dict of sums: loss_sum, target_count, byte_count (of token batches: the bytes the
  counted targets stand for, from the batch's token_bytes); loss and count per context-length bucket; and,
  when the batch marks answer tokens, how many the argmax got right."""
  def eval_step(params: nnx.State, batch: Batch) -> dict:
    outputs, losses, sums, _ = _forward(graphdef, params, batch)
    _, _, targets, weights = split_batch(batch)
    if 'token_bytes' in batch:
      sums['byte_count'] = jnp.sum(weights * batch['token_bytes'][:, 1:])
    bucket = position_bucket(context_lengths(batch['positions']), num_buckets).ravel()
    sums['bucket_loss'] = jax.ops.segment_sum(losses.ravel(), bucket, num_buckets)
    sums['bucket_count'] = jax.ops.segment_sum(weights.ravel(), bucket, num_buckets)
    if 'answer' in batch:  # weights are the answer tokens
      sums['answer_correct'] = jnp.sum(weights * (jnp.argmax(outputs, axis=-1) == targets))
      sums['answer_count'] = jnp.sum(weights)
    return sums
  return eval_step
