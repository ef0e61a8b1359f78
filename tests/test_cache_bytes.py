"""`cache_bytes` equals the decode-cache size each family's architecture implies, counted here from
its hyper-parameters (docs/architectures.md), not from the cache the model builds.

b is the cache dtype's size; every cached key or value slot also keeps its token index and document
(int32, 8 bytes); the cursor is 8 bytes a row; recurrent states are float32 whatever b is.
"""
import jax.numpy as jnp
import pytest
from flax import nnx

import architectures
from experiments import configs
from tests.helpers import CONFIGS

BATCH, CONTEXT = 3, 40


def kv_ring(slots: int, kv_heads: int, head_dim: int, b: int) -> int:
  """Keys and values of `slots` tokens, with their index and document."""
  return slots * (2 * kv_heads * head_dim * b + 8)


def expected_bytes(name: str, n: int, b: int) -> int:
  """One row's decode cache for a context of n tokens."""
  m = configs.get(name, 'tiny').model
  family = m.name
  if family in ('transformer', 'block_recurrent'):
    heads_dim = m.head_dim or m.dim // m.num_heads
    kv = m.num_kv_heads or m.num_heads
    slots = min(m.window, n) if m.window else n
    total = m.num_layers * kv_ring(slots, kv, heads_dim, b)
    if family == 'block_recurrent':  # each recurrent layer: S states (float32), their document, their K/V
      total += len(m.recurrent_layers) * (m.num_states * m.dim * 4 + 4 + 2 * m.num_states * kv * heads_dim * b)
    return 8 + total
  if family == 'griffin':
    kinds = [m.block_pattern[i % len(m.block_pattern)] for i in range(m.num_layers)]
    width = m.lru_width or m.dim  # RG-LRU state (float32) and the conv's last conv_width - 1 inputs
    recurrent = kinds.count('r') * (width * 4 + (m.conv_width - 1) * (width * b + 4))
    attention = kinds.count('a') * kv_ring(min(m.window, n), 1, m.dim // m.num_heads, b)  # local MQA
    return 8 + recurrent + attention
  if family == 'yoco':
    self_layers = m.num_self_layers or m.num_layers // 2
    heads = m.num_heads
    self_state = self_layers * heads * (m.dim // heads) ** 2 * 4  # gated retention: one d x d state per head
    return 8 + self_state + kv_ring(n, m.num_kv_heads or heads, m.dim // heads, b)
  if family == 'goldfinch':
    gold = m.num_layers - (2 * m.num_layers) // 3 if m.gold_layers < 0 else m.gold_layers
    shift = m.dim * b + 4                                           # one token shift: an input and its document
    heads = m.dim // m.head_dim
    rwkv = (m.num_layers - gold) * (2 * shift + heads * m.head_dim ** 2 * 4)  # time-mix and channel-mix shifts, wkv
    keys = n * (4 + m.dim // m.key_compression * b) + 4 if gold else 0  # token id and compressed key; offset
    return 8 + rwkv + gold * 2 * shift + keys
  if family == 'aaren':
    heads, head_dim = m.num_heads, m.dim // m.num_heads
    return 8 + m.num_layers * (heads * 4 * 2 + heads * head_dim * 4 + 4)  # running max, sum, weighted values
  raise AssertionError(f'no cache formula for family {family!r}: add it here')


@pytest.mark.parametrize('name', CONFIGS)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_cache_bytes_are_what_the_architecture_implies(name, dtype):
  model = nnx.eval_shape(lambda: architectures.create_model(configs.get(name, 'tiny').model.to_dict(), nnx.Rngs(0)))
  b = jnp.dtype(dtype).itemsize
  assert model.cache_bytes(BATCH, CONTEXT, dtype) == BATCH * expected_bytes(name, CONTEXT, b)
