"""Speed and memory measurements on synthetic data (used by experiments/benchmark.py and compare.py).

`benchmark_train_step`: compile time, median step time, tokens/s, MFU against
the chip's peak bf16 rate, peak device memory. Two MFUs: `mfu` counts the work
done (attention over each query's keys in its own document, the batch's
document lengths) and `mfu_maxtext` the MaxText-style formula (one document of
seq_len a row: full causal attention over the row), which overstates the work
of rows of several documents, whose other documents' key blocks are skipped.
Inference (the sampler's jitted generation) is measured by trainers/measurement/decode_speed.py.
Rows are random bytes packed as `docs_per_row` documents of random length; weights are random.
"""
import statistics
import time

import jax
import numpy as np
from absl import logging

from trainers.experiment import Experiment
from trainers.training.jitted_step import TrainStep
from trainers.training.metrics import peak_flops
from trainers.training.steps import split_batch


def synthetic_batch(batch_size: int, seq_len: int, seed: int = 0, docs_per_row: int = 4) -> dict[str, np.ndarray]:
  """Random byte tokens [B, seq_len + 1] in rows of exactly `docs_per_row` documents of random length
  (positions restart at 0 at each start); the same seed gives the same batch.

  The documents start within the model's input (the first seq_len tokens), each with at least one
  input token; the row's last document also holds the last target. docs_per_row=1: positions 0..seq_len.
  """
  if not 1 <= docs_per_row <= seq_len:
    raise ValueError(f'docs_per_row={docs_per_row} must be between 1 and seq_len={seq_len}')
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, size=(batch_size, seq_len + 1), dtype=np.int32)
  positions = np.zeros_like(tokens)
  for row in positions:
    starts = np.sort(rng.choice(np.arange(1, seq_len), size=docs_per_row - 1, replace=False))
    for segment in np.split(np.arange(seq_len + 1), starts):
      row[segment] = np.arange(len(segment))
  return dict(tokens=tokens, positions=positions)


def document_lengths(positions) -> np.ndarray:
  """int64 [documents]: the lengths of the documents of a model input's positions [B, T], in row order
  (each row's lengths sum to T), as `flops_per_token(T, doc_lengths=...)` takes them.

  A document starts at each position 0 and at each row's first token (a row that begins inside a
  document attends only to that document's tokens in the row). For a batch of rows of T + 1 tokens,
  pass the input part: `document_lengths(split_batch(batch)[1])`. Padding (-1) is refused: it belongs
  to no document, and the lengths would not sum to T.
  """
  positions = np.asarray(positions)
  if positions.ndim != 2:
    raise ValueError(f'positions must be [batch, length], got shape {positions.shape}')
  if (positions < 0).any():
    raise ValueError('positions hold padding (-1), which belongs to no document')
  starts = positions == 0
  starts[:, 0] = True
  start_index = np.flatnonzero(starts)
  return np.diff(np.append(start_index, starts.size)).astype(np.int64)


def train_flops_per_token(model, seq_len: int, positions) -> dict[str, float]:
  """Training FLOPs per token (3x the forward's matmul FLOPs) of rows of seq_len with input positions
  [B, seq_len]: `train_flops_per_token` by the work done (each query's keys within its own document,
  the rows' document lengths) and `train_flops_per_token_maxtext` by MaxText's formula (one document of
  seq_len a row), which is at least as large."""
  return dict(train_flops_per_token=3 * model.flops_per_token(seq_len, doc_lengths=document_lengths(positions)),
              train_flops_per_token_maxtext=3 * model.flops_per_token(seq_len))


def benchmark_train_step(config, num_steps: int, warmup: int, devices: list[jax.Device] | None = None,
                         docs_per_row: int = 4) -> dict:
  """Times the jitted train step on `devices` (default: all) with the mesh of `config.mesh`, on rows
  of `docs_per_row` documents (synthetic_batch).

  Every step sees the same batch, so `losses` (one per step, warm-up included) is a
  loss curve that runs on different meshes must reproduce. `mfu` counts the work done on
  that batch, `mfu_maxtext` MaxText's full causal attention over each row (train_flops_per_token).
  """
  started = time.perf_counter()
  exp = Experiment.build(config, devices)
  host_batch = synthetic_batch(config.batch_size, config.seq_len, docs_per_row=docs_per_row)
  flops = train_flops_per_token(exp.abstract_model, config.seq_len, split_batch(host_batch)[1])
  with exp.activate():
    state = exp.new_state()
    batch = exp.device_batch(host_batch)
    jax.block_until_ready(state)
    logging.info('state on %d devices after %.1f s', exp.mesh.size, time.perf_counter() - started)
    step = TrainStep(exp)
    leaves = step.leaves(state)
    start = time.perf_counter()
    compiled = step.lower(leaves, batch).compile()
    compile_s = time.perf_counter() - start
    logging.info('compiled in %.1f s', compile_s)
    times, losses = [], []
    for i in range(warmup + num_steps):
      start = time.perf_counter()
      leaves, metrics = compiled(leaves, batch)
      jax.block_until_ready(metrics)
      if i >= warmup:
        times.append(time.perf_counter() - start)
      losses.append(float(metrics['loss']))
  step_s = statistics.median(times)
  tokens_per_s = config.batch_size * config.seq_len / step_s
  devices = list(exp.mesh.devices.flat)
  peak = peak_flops(devices[0])
  memory = [d.memory_stats() or {} for d in devices]
  rate = None if peak is None else tokens_per_s / (peak * len(devices))  # MFU per training FLOP a token
  return dict(
      model=config.model.to_dict(), batch_size=config.batch_size, seq_len=config.seq_len, docs_per_row=docs_per_row,
      devices=len(devices), device_kind=devices[0].device_kind, compile_s=compile_s, step_s=step_s,
      step_s_all=times, tokens_per_s=tokens_per_s, tokens_per_s_per_device=tokens_per_s / len(devices),
      **flops,
      mfu=None if rate is None else rate * flops['train_flops_per_token'],
      mfu_maxtext=None if rate is None else rate * flops['train_flops_per_token_maxtext'],
      peak_memory_bytes=max((m.get('peak_bytes_in_use', 0) for m in memory), default=0) or None,
      losses=losses)


def timed(fn, *args):
  """(fn(*args) once computed, seconds it took)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start
