"""Measures the speed and memory of the jitted train step on synthetic batches.

  python -m experiments.benchmark --config=experiments/configs/transformer.py:150m --output=bench.json

Reports compile time, the median step time of `--steps` timed steps (after
`--warmup` untimed ones), tokens/s, MFU (MaxText-style FLOPs against the
chip's peak bf16 rate) and the device's peak memory; writes them as JSON.
Needs no dataset: rows are random bytes packed as documents of random length.
"""
import json
import statistics
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from trainers import steps
from trainers.experiment import Experiment
from trainers.logs import quiet_library_logs
from trainers.metrics import peak_flops

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:size].', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed train steps.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed train steps after the compile.')
_OUTPUT = flags.DEFINE_string('output', None, 'Where to write the JSON results.')


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


def benchmark_train_step(config, num_steps: int, warmup: int) -> dict:
  exp = Experiment.build(config)
  with exp.activate():
    state = exp.new_state()
    batch = exp.device_batch(synthetic_batch(config.batch_size, config.seq_len))
    step = jax.jit(steps.make_train_step(exp.graphdef, exp.tx, exp.schedule, config.get('grad_accum_steps', 1)),
                   in_shardings=(exp.state_shardings, exp.batch_sharding),
                   out_shardings=(exp.state_shardings, None), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(warmup + num_steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      if i >= warmup:
        times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  tokens_per_s = config.batch_size * config.seq_len / step_s
  devices = list(exp.mesh.devices.flat)
  peak = peak_flops(devices[0])
  flops_per_token = 3 * exp.abstract_model.flops_per_token(config.seq_len)
  memory = [d.memory_stats() or {} for d in devices]
  return dict(
      model=config.model.to_dict(), batch_size=config.batch_size, seq_len=config.seq_len,
      devices=len(devices), device_kind=devices[0].device_kind, compile_s=compile_s, step_s=step_s,
      step_s_all=times, tokens_per_s=tokens_per_s, train_flops_per_token=flops_per_token,
      mfu=None if peak is None else tokens_per_s * flops_per_token / (peak * len(devices)),
      peak_memory_bytes=max((m.get('peak_bytes_in_use', 0) for m in memory), default=0) or None,
      final_loss=float(metrics['loss']))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  results = benchmark_train_step(_CONFIG.value, _STEPS.value, _WARMUP.value)
  logging.info('%s', json.dumps({k: v for k, v in results.items() if k != 'step_s_all'}))
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
