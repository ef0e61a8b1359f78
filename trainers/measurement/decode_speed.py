"""Inference speed and memory as users run it: the sampler's one jitted generation call.

For each context C and batch size B, prompts of C - n tokens (one document of random bytes per
row, random weights) go through `sampling.generation_program`, compiled once with room for 1 + n new
tokens (greedy). Its traced count of new tokens lets the same program run twice:

  prefill_s           the call that prefills the prompt and samples 1 token (n = 0: all that is timed)
  decode_s_per_token  (the call with 1 + n new tokens - the call with 1) / n: the while loop's step
  decode_tokens_per_s B / decode_s_per_token
  program_bytes       the compiled call's arguments + outputs + temporaries (what it needs at its peak)
  cache_bytes         model.cache_bytes(B, C): the decode cache at the full context

`largest_batch` finds the largest B whose program fits the device's memory: the programs' bytes
at batch 1 and 2 split into a fixed and a per-row part, extrapolated, then checked by compiling.
A batch that does not fit is refused before running, naming the bytes it needs and has.
"""
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

import architectures
from trainers.inference.sampling import generation_program

MEMORY_HEADROOM = 0.92  # of the device's bytes_limit a program may plan to use (allocator slack)


def human_bytes(n: float) -> str:
  for unit, size in (('GiB', 2 ** 30), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if n >= size:
      return f'{n / size:.2f} {unit}'
  return f'{n:.0f} B'


class DoesNotFitError(ValueError):
  """A decode batch's program needs more device memory than there is."""


def random_params(config) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and randomly initialised parameters (config.seed), created in one jit."""
  def create():
    return nnx.split(architectures.create_model(config.model.to_dict(), nnx.Rngs(config.seed)), nnx.Param)[1]

  jax.config.update('jax_threefry_gpu_kernel_lowering', True)  # as Experiment.build: fast init compiles on GPU
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: architectures.create_model(config.model.to_dict(), nnx.Rngs(0))),
                          nnx.Param)
  return graphdef, jax.jit(create)()


def prompts(batch: int, length: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """One document of random bytes per row: tokens, positions [B, length]."""
  tokens = np.random.default_rng(seed).integers(0, 256, size=(batch, length), dtype=np.int32)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
  return jnp.asarray(tokens), jnp.asarray(positions)


def program_bytes(compiled) -> int:
  """What a compiled program holds at its peak: arguments, outputs (less those aliased) and temporaries."""
  stats = compiled.memory_analysis()
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
             + stats.temp_size_in_bytes)


def device_memory_limit(device: jax.Device) -> int | None:
  """Bytes a program may use on `device` (None where the platform does not say, e.g. CPU)."""
  stats = device.memory_stats() or {}
  return int(stats['bytes_limit'] * MEMORY_HEADROOM) if 'bytes_limit' in stats else None


class DecodeProgram:
  """The sampler's generation for one model, prompt length and batch, compiled; times its calls."""

  def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, config, batch: int, prompt_len: int,
               new_tokens: int, prefill_chunk: int):
    self.params = params
    self.tokens, self.positions = prompts(batch, prompt_len)
    self.cache_dtype = jnp.dtype(config.model.dtype)
    options = dict(max_new_tokens=1 + new_tokens, temperature=0.0, top_k=0, top_p=1.0, eos_id=None,
                   cache_dtype=self.cache_dtype, prefill_chunk=prefill_chunk)
    start = time.perf_counter()
    program = generation_program(nnx.merge(graphdef, params))
    self.compiled = program.lower(graphdef, params, self.tokens, self.positions, jax.random.key(0), jnp.int32(1),
                                  **options).compile()
    self.compile_s = time.perf_counter() - start
    self.bytes = program_bytes(self.compiled)

  def seconds(self, new_tokens: int, repeats: int) -> float:
    """Median wall time of the call generating `new_tokens`, after one untimed call."""
    run = lambda: jax.block_until_ready(self.compiled(self.params, self.tokens, self.positions, jax.random.key(0),
                                                      jnp.int32(new_tokens)))
    run()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_fits(need: int, limit: int | None, what: str) -> None:
  if limit is not None and need > limit:
    raise DoesNotFitError(f'{what} needs {human_bytes(need)} of device memory; {human_bytes(limit)} are usable '
                          f'({MEMORY_HEADROOM:.0%} of the device). Use a smaller --decode_batch, or --max_batch to '
                          'find the largest that fits')


def measure_point(program: DecodeProgram, model, batch: int, context: int, new_tokens: int, repeats: int,
                  limit: int | None, compile_only: bool = False) -> dict:
  """One context and batch: its program's bytes, and unless `compile_only` its timings (new_tokens = 0:
  the prefill alone)."""
  result = dict(context=context, batch=batch, compile_s=program.compile_s, program_bytes=program.bytes,
                cache_bytes=model.cache_bytes(batch, context, program.cache_dtype),
                fits=limit is None or program.bytes <= limit)
  if compile_only:
    logging.info('decode %s', result)
    return result
  check_fits(program.bytes, limit, f'batch {batch} at context {context}')
  result['prefill_s'] = prefill_s = program.seconds(1, repeats)
  result['prefill_tokens_per_s'] = batch * (context - new_tokens - 1) / prefill_s
  if new_tokens:
    per_token = max(program.seconds(1 + new_tokens, repeats) - prefill_s, 0.0) / new_tokens
    result.update(decode_s_per_token=per_token, decode_ms_per_token=per_token * 1e3,
                  decode_tokens_per_s=batch / per_token if per_token else None)
  memory = jax.devices()[0].memory_stats() or {}
  result['device_peak_bytes'] = memory.get('peak_bytes_in_use')
  logging.info('decode %s', {k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()})
  return result


def largest_batch(bytes_at: Callable[[int], float], limit: int, what: str, tries: int = 6) -> int:
  """The largest batch whose program fits in `limit` bytes, from `bytes_at(batch)` (a compiled program's
  bytes): a secant search on bytes(batch) = limit from batches 1 and 2, keeping the largest that fit."""
  points = [(1, bytes_at(1))]
  check_fits(points[0][1], limit, f'{what} at batch 1')
  points.append((2, bytes_at(2)))
  best = 2 if points[1][1] <= limit else 1
  for _ in range(tries):
    (b0, m0), (b1, m1) = points[-2:]
    slope = max((m1 - m0) / (b1 - b0), 1.0) if m1 != float('inf') else float('inf')
    guess = max(1, int(b1 + (limit - m1) / slope)) if slope != float('inf') else max(1, (b0 + b1) // 2)
    if guess in dict(points):
      break
    points.append((guess, bytes_at(guess)))
    if points[-1][1] <= limit:
      best = max(best, guess)
  return best


def benchmark_decode(config, contexts: list[int], batches: list[int], new_tokens: int, *, max_batch: bool = False,
                     prefill_chunk: int = 0, repeats: int = 3, memory_limit: int | None = None,
                     compile_only: bool = False) -> dict:
  """Prefill and decode of the sampler's jitted loop at each context (prompt + new tokens) and batch.

  `new_tokens` = 0: the prefill alone. `max_batch`: also the largest batch that fits at each context.
  `memory_limit`: bytes a program may use (default: from the device; None on CPU). `compile_only`: the
  programs' bytes and whether they fit, nothing run.
  """
  if new_tokens < 0:
    raise ValueError(f'new_tokens={new_tokens}: must be >= 0 (0: the prefill alone)')
  for context in contexts:
    if context <= new_tokens + 1:
      raise ValueError(f'context {context} must exceed the {new_tokens + 1} generated tokens')
  if max_batch and memory_limit is None and device_memory_limit(jax.devices()[0]) is None:
    raise ValueError('--max_batch needs a device that reports its memory (a GPU or TPU)')
  graphdef, params = random_params(config)
  model = nnx.merge(graphdef, params)
  limit = memory_limit if memory_limit is not None else device_memory_limit(jax.devices()[0])
  results = []
  for context in contexts:
    programs: dict[int, DecodeProgram] = {}

    def program(batch: int) -> DecodeProgram:
      if batch not in programs:
        programs[batch] = DecodeProgram(graphdef, params, config, batch, context - new_tokens - 1, new_tokens,
                                        prefill_chunk)
      return programs[batch]

    sizes = list(batches) + ([largest_batch(lambda b: program(b).bytes, limit, f'context {context}')]
                             if max_batch else [])
    for batch in dict.fromkeys(sizes):
      results.append(measure_point(program(batch), model, batch, context, new_tokens, repeats, limit, compile_only))
      results[-1]['largest_batch'] = max_batch and batch == sizes[-1]
  return dict(model=config.model.to_dict(), new_tokens=new_tokens, prefill_chunk=prefill_chunk,
              device_kind=jax.devices()[0].device_kind, memory_limit_bytes=limit, results=results)
