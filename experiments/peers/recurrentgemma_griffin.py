"""recurrentgemma's JAX Griffin (Flax Linen) at our config's shape: the Griffin peer, in training
(`benchmark`) and in decoding with its own Sampler (`DecodePeer`).

Same batch of synthetic packed rows (`docs_per_row` documents a row, their
boundaries given by the positions, which it reads as we do), bf16 compute with
float32 parameters, AdamW (optax), one jitted step with the state donated.
Its local attention sees `window - 1` earlier keys (our `window` counts the query itself). Install with
`pip install --no-deps -r tests/reference_requirements.txt`.
"""
import statistics
import time

import jax
import jax.numpy as jnp
import jaxtyping
import optax
import recurrentgemma.jax as rg

from trainers.measurement.decode_speed import program_bytes
from trainers.measurement.train_speed import synthetic_batch


def reference_config(model) -> rg.GriffinConfig:
  kinds = {'r': rg.TemporalBlockType.RECURRENT, 'a': rg.TemporalBlockType.ATTENTION}
  pattern = model.block_pattern
  return rg.GriffinConfig(
      vocab_size=model.vocab_size, width=model.dim, mlp_expanded_width=model.mlp_dim or 3 * model.dim,
      num_heads=model.num_heads, lru_width=model.lru_width or model.dim,
      block_types=tuple(kinds[pattern[i % len(pattern)]] for i in range(model.num_layers)),
      embeddings_scale_by_sqrt_dim=model.scale_embeddings, attention_window_size=model.window - 1,
      logits_soft_cap=model.logits_soft_cap, scan_type=rg.ScanType.ASSOCIATIVE_NATIVE)


def benchmark(config, num_steps: int, warmup: int, docs_per_row: int = 1) -> dict:
  """Times the training step on our synthetic rows of `docs_per_row` documents (the same batch as ours:
  its attention is masked to each document and its recurrence resets at position 0)."""
  griffin = rg.Griffin(reference_config(config.model), gradient_checkpointing=config.model.remat != 'none',
                       dtype=jnp.dtype(config.model.dtype), param_dtype=jnp.float32)
  batch = synthetic_batch(config.batch_size, config.seq_len, docs_per_row=docs_per_row)
  tokens, positions = jnp.asarray(batch['tokens']), jnp.asarray(batch['positions'])
  params = jax.jit(griffin.init)(jax.random.key(0), tokens[:, :-1], positions[:, :-1])
  tx = optax.adamw(config.optimizer.learning_rate, weight_decay=config.optimizer.weight_decay)
  opt_state = tx.init(params)

  def loss_fn(params):  # next-token cross-entropy over every position
    logits, _ = griffin.apply(params, tokens[:, :-1], positions[:, :-1], return_cache=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:]).mean()

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(warmup + num_steps):
    start = time.perf_counter()
    params, opt_state, loss = jax.block_until_ready(compiled(params, opt_state))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  memory = jax.devices()[0].memory_stats() or {}
  return dict(peer='recurrentgemma Griffin (JAX, associative scan)', compile_s=compile_s, step_s=step_s,
              tokens_per_s=config.batch_size * config.seq_len / step_s,
              params=sum(x.size for x in jax.tree.leaves(params)), peak_memory_bytes=memory.get('peak_bytes_in_use'),
              final_loss=float(loss))


class _TokenIds:
  """The two ids recurrentgemma's Sampler reads from its vocabulary (it never stops early here)."""

  def pad_id(self) -> int:
    return 0

  def eos_id(self) -> int:
    return 1


def decode_peer(config, max_context: int) -> 'SamplerTimer':
  del max_context  # recurrentgemma's caches are sized by its window
  return SamplerTimer(config)


class SamplerTimer:
  """recurrentgemma's own Sampler at our config's shape: its jitted prompt processing, then its jitted
  sampling while_loop, greedy, bf16 parameters (ours are cast to bf16 inside the sampler's call)."""

  name = 'recurrentgemma Sampler (JAX: prompt processing + sampling while_loop), bf16'

  def __init__(self, config):
    # Its run-time type checks (jaxtyping + typeguard) refuse the abstract arrays of ahead-of-time
    # compilation; they check only while tracing, so the compiled programs are the same without them.
    jaxtyping.config.update('jaxtyping_disable', True)
    self.griffin = rg.Griffin(reference_config(config.model), dtype=jnp.dtype(config.model.dtype),
                              param_dtype=jnp.float32)
    init_tokens = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(self.griffin.init)(jax.random.key(0), init_tokens, jnp.arange(8)[None])['params']
    self.params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    self.sampler = rg.Sampler(model=self.griffin, vocab=_TokenIds(), params=self.params)
    self.compiled = {}

  def _programs(self, context: int, batch: int, new_tokens: int):
    """The compiled prompt-processing and sampling functions for one shape, and their peak bytes."""
    key = (context, batch, new_tokens)
    try:
      return self._compile(key, context, batch, new_tokens)
    except jax.errors.JaxRuntimeError as e:  # its [T, T] attention scores did not fit, or their autotuning
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      raise MemoryError(f'{self.name} ran out of memory at batch {batch}, context {context}') from e

  def _compile(self, key, context: int, batch: int, new_tokens: int):
    if key not in self.compiled:
      tokens, lengths = self._prompt(context, batch, new_tokens)
      prompt_fn = self.sampler._compiled_prompt_processing_fn.lower(
          self.params, tokens, None, lengths, 1 + new_tokens, False, False).compile()
      state = jax.eval_shape(lambda: self.sampler._prompt_processing_fn(
          self.params, tokens, None, lengths, 1 + new_tokens, False, False))
      sample_fn = self.sampler._compiled_sample_fn.lower(self.params, state, False).compile()
      self.compiled[key] = prompt_fn, sample_fn, max(program_bytes(prompt_fn), program_bytes(sample_fn))
    return self.compiled[key]

  @staticmethod
  def _prompt(context: int, batch: int, new_tokens: int):
    prompt_len = context - new_tokens - 1
    tokens = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, 256, jnp.int32)
    return tokens, jnp.full((batch,), prompt_len, jnp.int32)

  def decode_bytes(self, context: int, batch: int, new_tokens: int) -> int:
    return self._programs(context, batch, new_tokens)[2]

  def decode_point(self, context: int, batch: int, new_tokens: int, repeats: int) -> dict:
    prompt_fn, sample_fn, peak_bytes = self._programs(context, batch, new_tokens)
    try:
      return self._time(prompt_fn, sample_fn, peak_bytes, context, batch, new_tokens, repeats)
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      raise MemoryError(f'{self.name} ran out of memory at batch {batch}, context {context}') from e

  def _time(self, prompt_fn, sample_fn, peak_bytes: int, context: int, batch: int, new_tokens: int,
            repeats: int) -> dict:
    prefill_times, decode_times = [], []
    for i in range(1 + repeats):  # the first round untimed
      tokens, lengths = self._prompt(context, batch, new_tokens)  # donated by the sampler: new each call
      start = time.perf_counter()
      state = jax.block_until_ready(prompt_fn(self.params, tokens, None, lengths))
      prefill_s = time.perf_counter() - start
      start = time.perf_counter()
      jax.block_until_ready(sample_fn(self.params, state))
      if i:
        prefill_times.append(prefill_s)
        decode_times.append((time.perf_counter() - start) / new_tokens)
    return dict(prefill_s=statistics.median(prefill_times), decode_s_per_token=statistics.median(decode_times),
                program_bytes=peak_bytes)
