"""`cache_bytes` equals the decode-cache size each family's architecture implies, counted here from
its hyper-parameters (docs/architectures.md), not from the cache the model builds.

b is the cache dtype's size; every cached key or value slot also keeps its token index and document
(int32, 8 bytes); the cursor is 8 bytes a row; recurrent states are float32 whatever b is.
"""
from collections.abc import Mapping
from typing import Any

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


def hybrid_bytes(model_fields: Mapping[str, Any], n: int, b: int) -> int:
  """One row's decode cache of a hybrid: each layer's mixer's (and channel mix's) state, and the shared-keys
  stage's, from the mixers' blocks (architectures/hybrid_mixers.py)."""
  m = architectures.model_config(model_fields)  # the pattern and every block with its defaults filled in
  d = m.dim
  shift = d * b + 4  # a token shift: the last input and its document

  def heads(block) -> tuple[int, int, int]:
    num = block['num_heads']
    return num, block.get('num_kv_heads', 0) or num, block.get('head_dim', 0) or d // num

  def layer(kind: str) -> int:
    if kind in ('attention', 'local_attention'):
      block = getattr(m, kind)
      _, kv, head_dim = heads(block)
      return kv_ring(min(block['window'], n) if block['window'] else n, kv, head_dim, b)
    if kind == 'rg_lru':
      width = m.rg_lru['width'] or d  # RG-LRU state (float32) and the conv's last conv_width - 1 inputs
      return width * 4 + (m.rg_lru['conv_width'] - 1) * (width * b + 4)
    if kind == 'gated_retention':
      return d * d // m.gated_retention['num_heads'] * 4  # one (D / N)^2 float32 state per head
    if kind == 'wkv6':
      return d * m.wkv6['head_dim'] * 4 + shift  # one H x H float32 state per head; the time mix's token shift
    if kind == 'aaren':
      num, _, head_dim = heads(m.aaren)
      return num * 4 * 2 + num * head_dim * 4 + 4  # running max, sum, weighted values; their document
    if kind in ('windowed_attention', 'block_recurrent'):
      block = m.block_recurrent
      num, kv, head_dim = heads(block)
      wide = block['span'] == 'block' or kind == 'block_recurrent' and block['state_reads_previous_window']
      ring = kv_ring(block['window'] * (2 if wide else 1), kv, head_dim, b)
      states = block['num_states']  # S states (float32), their document, their K/V
      return ring + (states * d * 4 + 4 + 2 * states * kv * head_dim * b if kind == 'block_recurrent' else 0)
    if kind == 'cross_attention':
      return 0  # reads the one shared K/V
    assert kind == 'gold', f'no cache formula for the mixer {kind!r}: add it here'
    return shift  # the queries' token shift

  total = sum(layer(kind) + (shift if m.mlp == 'channel_mix' else 0) for kind in m.kinds)
  if 'cross_attention' in m.kinds:  # the shared K/V of every token
    total += kv_ring(n, m.cross_attention['num_kv_heads'] or m.cross_attention['num_heads'],
                     d // m.cross_attention['num_heads'], b)
  if 'gold' in m.kinds:  # token id and compressed key of every token; the row's position offset
    total += n * (4 + d // m.gold['key_compression'] * b) + 4
  return 8 + total


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
  if family == 'hybrid':
    return hybrid_bytes(m.to_dict(), n, b)
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
