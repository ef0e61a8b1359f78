"""Generation with a model's decode cache: batched prompts of different lengths,
greedy / temperature / top-k / top-p sampling, stopping at an end token.

Prompts are left-padded (padding has position -1, which every family ignores),
prefilled (`SequenceModel.prefill`: in one call, or `prefill_chunk` tokens per
call so that memory stays O(chunk x context)) and extended one token per step
inside one jitted `lax.while_loop`, so the host waits once for the whole
generation. Inside that function the matmul weights are cast once to the
compute dtype they are used in, so a decode step reads bf16 weights.
"""
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from architectures.base import SequenceModel
from layers.blocks.embedding import Embed
from layers.blocks.linear import Dense
from trainers.tokenizer import Tokenizer


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """logits [B, V] -> tokens [B]; temperature 0 is argmax."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Prompts -> tokens, positions [B, P] with padding (position -1) on the left."""
  width = max(len(p) for p in prompts)
  if min(len(p) for p in prompts) == 0:
    raise ValueError('every prompt needs at least one token')
  tokens = np.zeros((len(prompts), width), np.int32)
  positions = np.full((len(prompts), width), -1, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, width - len(prompt):] = prompt
    positions[row, width - len(prompt):] = np.arange(len(prompt))
  return tokens, positions


def cast_matmul_weights(model: SequenceModel) -> None:
  """Stores each Dense kernel and embedding table in the dtype its module computes in (in place).

  Both modules cast their weight to that dtype at every use, so the outputs do not change; a decode
  step then reads the weights once in bf16 instead of converting float32 ones first.
  """
  for _, module in nnx.iter_modules(model):
    weight = module.kernel if isinstance(module, Dense) else module.table if isinstance(module, Embed) else None
    if weight is not None:
      weight.set_value(weight[...].astype(module.dtype))


def generation_program(model: SequenceModel) -> Callable[..., jax.Array]:
  """`generate_tokens` jitted with the compiler options of `model`'s family (decode_compiler_options)."""
  return _jitted_generation(tuple(sorted(model.decode_compiler_options.items())))


@functools.cache
def _jitted_generation(compiler_options: tuple[tuple[str, str], ...]) -> Callable[..., jax.Array]:
  return jax.jit(generate_tokens, compiler_options=dict(compiler_options) or None,
                 static_argnames=('graphdef', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'eos_id',
                                  'cache_dtype', 'prefill_chunk'))


def generate_tokens(graphdef, state, tokens: jax.Array, positions: jax.Array, key: jax.Array,
                    num_new_tokens: jax.Array, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                    eos_id: int | None, cache_dtype, prefill_chunk: int = 0) -> jax.Array:
  """The whole generation, to be jitted as one call (generation_program): prompts [B, P] (left-padded) ->
  new tokens [B, N], -1 after `eos_id` or past `num_new_tokens` (an int32 scalar, at most N = max_new_tokens
  counted: one compiled program serves any count up to N, never writing its cache past the prompt and N new
  tokens; the benchmark times 1 and 1 + n new tokens with it)."""
  model = nnx.merge(graphdef, state)
  cast_matmul_weights(model)
  batch, prompt_len = tokens.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens, cache_dtype)
  logits, cache = model.prefill(tokens, positions, cache, prefill_chunk)  # [B, 1, V]
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  out = jnp.full((batch, max_new_tokens), -1, jnp.int32)

  def cond(carry):  # never past max_new_tokens: the cache holds prompt_len + max_new_tokens tokens
    i, _, _, _, done, _ = carry
    return (i < jnp.minimum(num_new_tokens, max_new_tokens)) & ~jnp.all(done)

  def body(carry):
    i, logits, cache, position, done, out = carry
    token = jnp.where(done, -1, sample(logits[:, -1], jax.random.fold_in(key, i)))
    out = out.at[:, i].set(token)
    done = done | (token == eos_id) if eos_id is not None else done
    logits, cache = model(jnp.maximum(token, 0)[:, None], position[:, None], cache)
    return i + 1, logits, cache, position + 1, done, out

  start = (jnp.int32(0), logits, cache, positions[:, -1] + 1, jnp.zeros((batch,), bool), out)
  return jax.lax.while_loop(cond, body, start)[-1]


def generate(model: SequenceModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
             seed: int = 0, cache_dtype=jnp.bfloat16, prefill_chunk: int = 0) -> list[np.ndarray]:
  """New tokens for each prompt (up to and including `eos_id`, at most `max_new_tokens`).

  `prefill_chunk` (config.prefill_chunk): prompt tokens per prefill call, 0 = the whole prompt at once.
  """
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1:
    raise ValueError(f'need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1; got '
                     f'{temperature}, {top_p}, {top_k}, {max_new_tokens}')
  if prefill_chunk < 0:
    raise ValueError(f'prefill_chunk={prefill_chunk}: must be >= 0 (0 = the whole prompt in one call)')
  options = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, seed=seed,
                 cache_dtype=cache_dtype, prefill_chunk=prefill_chunk)
  lengths = sorted({len(p) for p in prompts})
  if not model.left_padding_invariant and len(lengths) > 1:  # one batch per prompt length: no padding
    by_length = {n: generate(model, [p for p in prompts if len(p) == n], max_new_tokens, **options) for n in lengths}
    return [by_length[len(p)].pop(0) for p in prompts]
  tokens, positions = left_pad(prompts)
  graphdef, state = nnx.split(model)
  program = generation_program(model)
  out = np.asarray(program(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), jax.random.key(seed),
                           jnp.int32(max_new_tokens), max_new_tokens=max_new_tokens, temperature=float(temperature),
                           top_k=int(top_k), top_p=float(top_p), eos_id=eos_id, cache_dtype=jnp.dtype(cache_dtype),
                           prefill_chunk=int(prefill_chunk)))
  return [row[row >= 0] for row in out]


def generate_text(model: SequenceModel, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int, *,
                  bos: bool = False, **options) -> list[bytes]:
  """The bytes each prompt continues with, up to the tokenizer's end of sequence: the prompts encoded by
  `tokenizer` (after its BOS with `bos`, as models trained with one expect), continued by `generate` (`options`:
  temperature, top_k, top_p, seed, cache_dtype, prefill_chunk) and decoded."""
  prefix = [tokenizer.bos_id] if bos and tokenizer.bos_id is not None else []
  encoded = [np.concatenate([prefix, tokenizer.encode(prompt)]).astype(np.int32) for prompt in prompts]
  outputs = generate(model, encoded, max_new_tokens, eos_id=tokenizer.eos_id, **options)
  return [tokenizer.decode(tokens) for tokens in outputs]
