"""Forward+backward time of one sequence-mixing operator on random inputs (benchmark.py --mode=op).

  wkv              RWKV-6 wkv (layers/mixers/wkv.py, impl 'auto': the fused Pallas kernels on a GPU);
                   peer: flash-linear-attention chunk_rwkv6
  wkv_chunked      the same, chunked form in XLA
  gated_retention  YOCO's gated retention, chunked form (layers/mixers/gated_retention_ops.py)
  attention        causal multi-head self-attention over rows of up to 4 documents
                   (layers/kernels/attention_ops.self_attention, impl 'auto': cuDNN on a GPU)
  rg_lru           Griffin's RG-LRU from its gates' pre-activations, width W = H x D (layers/mixers/rg_lru.py,
                   impl 'auto': the fused Pallas kernels on a GPU)
  rg_lru_xla       the same in XLA: elementwise passes around an associative scan

Inputs are [B, T, H, D] in bf16 with float32 decays; the recurrences see one
document per row (no reset inside, as the peer's dense call); the timed function is the jitted
value and gradient of <y, dy> with respect to every input, i.e. forward + backward (the value keeps
XLA from dropping the forward's outputs, which the gradient alone does not need).
"""
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from layers.kernels import attention_ops
from layers.mixers.gated_retention_ops import chunked_retention
from layers.mixers.rg_lru import a_param_init, rg_lru
from layers.mixers.wkv import wkv
from trainers.measurement.train_speed import timed


def _wkv_inputs(key, batch: int, seq_len: int, heads: int, head_dim: int) -> tuple:
  kr, kk, kv, kw, ku = jax.random.split(key, 5)
  shape = (batch, seq_len, heads, head_dim)
  r, k, v = (jax.random.normal(x, shape, jnp.bfloat16) for x in (kr, kk, kv))
  log_w = jax.nn.log_sigmoid(jax.random.normal(kw, shape, jnp.float32))             # [B, T, H, D], <= 0
  u = jax.random.normal(ku, (heads, head_dim), jnp.float32)
  return r, k, v, log_w, u


def _retention_inputs(key, batch: int, seq_len: int, heads: int, head_dim: int) -> tuple:
  kq, kk, kv, kg = jax.random.split(key, 4)
  shape = (batch, seq_len, heads, head_dim)
  q, k, v = (jax.random.normal(x, shape, jnp.bfloat16) for x in (kq, kk, kv))
  log_decay = jax.nn.log_sigmoid(jax.random.normal(kg, (batch, seq_len, heads), jnp.float32) + 4.0)  # [B, T, H]
  return q, k, v, log_decay


def _attention_inputs(key, batch: int, seq_len: int, heads: int, head_dim: int) -> tuple:
  return tuple(jax.random.normal(x, (batch, seq_len, heads, head_dim), jnp.bfloat16) for x in jax.random.split(key, 3))


def packed_documents(batch: int, length: int) -> jax.Array:
  """The document of each token [B, T] int32 in rows packing up to 4 documents, cut at random places (fixed seed)."""
  cuts = np.sort(np.random.default_rng(0).integers(1, length, size=(batch, 3)), axis=1)         # [B, 3]
  return jnp.asarray((np.arange(length)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Self-attention over rows of `packed_documents`."""
  batch, length = q.shape[:2]
  index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return attention_ops.self_attention(q, k, v, index, packed_documents(batch, length), None, q.shape[-1] ** -0.5,
                                      'auto')


def _rg_lru_inputs(key, batch: int, seq_len: int, heads: int, head_dim: int) -> tuple:
  kx, kg, ka = jax.random.split(key, 3)
  width = heads * head_dim
  x = jax.random.normal(kx, (batch, seq_len, width), jnp.bfloat16)
  gate_logits = jax.random.normal(kg, (batch, seq_len, 2, width), jnp.bfloat16)
  return x, gate_logits, a_param_init()(ka, (width,))


def _rg_lru(impl: str) -> Callable:
  def forward(x: jax.Array, gate_logits: jax.Array, a_param: jax.Array) -> jax.Array:
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])  # one document a row
    return rg_lru(x, gate_logits, a_param, positions, None, impl=impl)[0]
  return forward


def _wkv(impl: str) -> Callable:
  return lambda r, k, v, log_w, u: wkv(r, k, v, log_w, u, _no_reset(r), impl=impl)[0]


def _no_reset(x: jax.Array) -> jax.Array:
  return jnp.zeros(x.shape[:2], bool)                                               # [B, T]


OPERATORS: dict[str, tuple[Callable, Callable]] = {
    'wkv': (_wkv_inputs, _wkv('auto')),
    'wkv_chunked': (_wkv_inputs, _wkv('chunked')),
    'gated_retention': (_retention_inputs,
                        lambda q, k, v, g: chunked_retention(q, k, v, g, _no_reset(q), chunk_size=64)[0]),
    'attention': (_attention_inputs, _attention),
    'rg_lru': (_rg_lru_inputs, _rg_lru('auto')),
    'rg_lru_xla': (_rg_lru_inputs, _rg_lru('associative')),
}


def benchmark_operator(name: str, batch: int, seq_len: int, heads: int, head_dim: int, num_steps: int) -> dict:
  """Median seconds of a jitted forward + backward of operator `name` at [B, T, H, D]."""
  if name not in OPERATORS:
    raise ValueError(f'unknown operator {name!r}; known: {sorted(OPERATORS)}')
  make_inputs, forward = OPERATORS[name]
  inputs = make_inputs(jax.random.key(0), batch, seq_len, heads, head_dim)
  y = jax.eval_shape(forward, *inputs)
  dy = jax.random.normal(jax.random.key(1), y.shape, jnp.float32)
  grad = jax.jit(jax.value_and_grad(lambda args: jnp.vdot(forward(*args), dy)))  # the value: y is computed
  start = time.perf_counter()
  compiled = grad.lower(inputs).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(inputs))
  times = [timed(compiled, inputs)[1] for _ in range(num_steps)]
  return dict(operator=name, batch=batch, seq_len=seq_len, heads=heads, head_dim=head_dim,
              device_kind=jax.devices()[0].device_kind, compile_s=compile_s, fwd_bwd_s=statistics.median(times),
              fwd_bwd_s_all=times)
