"""What each parameter is for, declared where it is created.

Every `nnx.Param` carries a `role` in its metadata; the optimizer reads it
(trainers/training/optimizer.py decides weight decay by role, never by shape), and it
survives `nnx.vmap` stacking, so `scan_layers` changes nothing.

  projection  a matrix applied to activations: dense kernels, block-diagonal
              gate weights, depthwise temporal-conv taps
  embedding   the token embedding table
  norm        norm scales and offsets (RMSNorm, LayerNorm, QK norms)
  bias        additive biases (dense, conv, gate, T5 relative-position buckets)
  recurrence  what sets a recurrence's memory or token shift: RG-LRU a, RWKV
              decay, bonus and token-shift mix coefficients
  lora        low-rank data-dependent mixing / decay (RWKV-6's w1 / w2)
  state       learned state ids and initial recurrent states
  query       learned queries (Aaren)
"""
from typing import Any

from flax import nnx

PROJECTION = 'projection'
EMBEDDING = 'embedding'
NORM = 'norm'
BIAS = 'bias'
RECURRENCE = 'recurrence'
LORA = 'lora'
STATE = 'state'
QUERY = 'query'
ROLES = (PROJECTION, EMBEDDING, NORM, BIAS, RECURRENCE, LORA, STATE, QUERY)


def param(value: Any, role: str) -> nnx.Param:
  """An nnx.Param of `value` (an array, or an initialiser's partitioned value) with its role."""
  if role not in ROLES:
    raise ValueError(f'unknown parameter role {role!r}; known: {ROLES}')
  return nnx.Param(value, role=role)


def role_of(variable: nnx.Variable) -> str | None:
  return variable.get_metadata().get('role')
