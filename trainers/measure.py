"""Speed and memory measurements on synthetic data (used by experiments/benchmark.py and compare.py).

`benchmark_train_step`: compile time, median step time, tokens/s, MFU
(MaxText-style FLOPs against the chip's peak bf16 rate), peak device memory.
`benchmark_decode`: per context length, the prefill time of a prompt that
long, the time per generated token after it and the exact decode-cache bytes.
Rows are random bytes packed as documents of random length; weights are random.
"""
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

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


def benchmark_decode(config, contexts: list[int], batch: int, num_tokens: int) -> dict:
  """Prefill time, per-token decode time and cache bytes at each context length (random weights)."""
  exp = Experiment.build(config)
  model = nnx.merge(exp.graphdef, exp.new_state().params)
  graphdef, state = nnx.split(model)
  cache_dtype = jnp.dtype(config.model.dtype)
  prefill = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s)(t, p, c, last_only=True))
  step = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s)(t, p, c), donate_argnums=3)
  results = []
  for context in contexts:
    prompt = synthetic_batch(batch, context - 1)
    tokens, positions = (jnp.asarray(prompt[k]) for k in ('tokens', 'positions'))
    cache = model.init_cache(batch, context + num_tokens + 1, cache_dtype)
    compiled_prefill = prefill.lower(state, tokens, positions, cache).compile()
    (logits, cache), prefill_s = timed(compiled_prefill, state, tokens, positions, cache)
    token, position = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32), positions[:, -1:] + 1
    compiled_step = step.lower(state, token, position, cache).compile()
    per_token = []
    for _ in range(num_tokens + 1):
      (logits, cache), seconds = timed(compiled_step, state, token, position, cache)
      per_token.append(seconds)
      token, position = jnp.argmax(logits, axis=-1).astype(jnp.int32), position + 1
    results.append(dict(context=context, prefill_s=prefill_s, decode_s_per_token=statistics.median(per_token[1:]),
                        cache_bytes=model.cache_bytes(batch, context, cache_dtype)))
    logging.info('%s', json.dumps(results[-1]))
  return dict(model=config.model.to_dict(), batch=batch, device_kind=jax.devices()[0].device_kind,
              contexts=results)
