"""Speed and memory measurements on synthetic data (used by experiments/benchmark.py and compare.py).

`benchmark_train_step`: compile time, median step time, tokens/s, MFU
(MaxText-style FLOPs against the chip's peak bf16 rate), peak device memory.
Inference (the sampler's jitted generation) is measured by trainers/measure_decode.py.
Rows are random bytes packed as documents of random length; weights are random.
"""
import statistics
import time

import jax
import numpy as np
from absl import logging

from trainers.experiment import Experiment
from trainers.jitted_step import TrainStep
from trainers.metrics import peak_flops


def synthetic_batch(batch_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random byte tokens in rows of documents of random length (positions restart at 0)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, size=(batch_size, seq_len + 1), dtype=np.int32)
  positions = np.zeros_like(tokens)
  for row in positions:
    starts = np.sort(rng.choice(np.arange(1, seq_len + 1), size=3, replace=False))
    for segment in np.split(np.arange(seq_len + 1), starts):
      row[segment] = np.arange(len(segment))
  return dict(tokens=tokens, positions=positions)


def benchmark_train_step(config, num_steps: int, warmup: int, devices: list[jax.Device] | None = None) -> dict:
  """Times the jitted train step on `devices` (default: all) with the mesh of `config.mesh`.

  Every step sees the same batch, so `losses` (one per step, warm-up included) is a
  loss curve that runs on different meshes must reproduce.
  """
  started = time.perf_counter()
  exp = Experiment.build(config, devices)
  with exp.activate():
    state = exp.new_state()
    batch = exp.device_batch(synthetic_batch(config.batch_size, config.seq_len))
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
  flops_per_token = 3 * exp.abstract_model.flops_per_token(config.seq_len)
  memory = [d.memory_stats() or {} for d in devices]
  return dict(
      model=config.model.to_dict(), batch_size=config.batch_size, seq_len=config.seq_len,
      devices=len(devices), device_kind=devices[0].device_kind, compile_s=compile_s, step_s=step_s,
      step_s_all=times, tokens_per_s=tokens_per_s, tokens_per_s_per_device=tokens_per_s / len(devices),
      train_flops_per_token=flops_per_token,
      mfu=None if peak is None else tokens_per_s * flops_per_token / (peak * len(devices)),
      peak_memory_bytes=max((m.get('peak_bytes_in_use', 0) for m in memory), default=0) or None,
      losses=losses)


def timed(fn, *args):
  """(fn(*args) once computed, seconds it took)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start
