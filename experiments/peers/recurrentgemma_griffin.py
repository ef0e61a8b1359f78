"""recurrentgemma's JAX Griffin (Flax Linen) trained at our config's shape: the Griffin peer.

Same batch of synthetic packed rows, bf16 compute with float32 parameters, AdamW
(optax), one jitted step with the state donated. Its local attention sees
`window - 1` earlier keys (our `window` counts the query itself). Install with
`pip install --no-deps -r tests/reference_requirements.txt`.
"""
import statistics
import time

import jax
import jax.numpy as jnp
import optax
import recurrentgemma.jax as rg

from trainers.measure import synthetic_batch


def reference_config(model) -> rg.GriffinConfig:
  kinds = {'r': rg.TemporalBlockType.RECURRENT, 'a': rg.TemporalBlockType.ATTENTION}
  pattern = model.block_pattern
  return rg.GriffinConfig(
      vocab_size=model.vocab_size, width=model.dim, mlp_expanded_width=model.mlp_dim or 3 * model.dim,
      num_heads=model.num_heads, lru_width=model.lru_width or model.dim,
      block_types=tuple(kinds[pattern[i % len(pattern)]] for i in range(model.num_layers)),
      embeddings_scale_by_sqrt_dim=model.scale_embeddings, attention_window_size=model.window - 1,
      logits_soft_cap=model.logits_soft_cap, scan_type=rg.ScanType.ASSOCIATIVE_NATIVE)


def benchmark(config, num_steps: int, warmup: int) -> dict:
  griffin = rg.Griffin(reference_config(config.model), gradient_checkpointing=config.model.remat != 'none',
                       dtype=jnp.dtype(config.model.dtype), param_dtype=jnp.float32)
  batch = synthetic_batch(config.batch_size, config.seq_len)
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
