"""Peer implementations timed beside ours by `experiments/benchmark.py --peer` (same shape, same run).

  griffin      recurrentgemma's own JAX Griffin (peers/recurrentgemma_griffin.py)
  transformer  transformers' LlamaForCausalLM, SDPA + torch.compile + fused AdamW (peers/llama_torch.py)
  op wkv       flash-linear-attention's Triton chunk_rwkv6 (peers/fla_rwkv6.py)

Each peer module is imported only when asked for: they need packages (recurrentgemma,
torch, transformers, fla) that the project itself does not depend on.
"""
import importlib

PEER_MODULES = {'griffin': 'recurrentgemma_griffin', 'transformer': 'llama_torch'}
OPERATOR_PEER_MODULES = {'wkv': 'fla_rwkv6'}


def benchmark_peer(config, num_steps: int, warmup: int) -> dict:
  """Times the peer of `config.model.name` at the config's shape, batch and length."""
  family = config.model.name
  if family not in PEER_MODULES:
    raise ValueError(f'config.model.name={family!r} has no peer; peers exist for {sorted(PEER_MODULES)}')
  module = importlib.import_module(f'experiments.peers.{PEER_MODULES[family]}')
  return module.benchmark(config, num_steps, warmup)


def benchmark_operator_peer(name: str, batch: int, seq_len: int, heads: int, head_dim: int, num_steps: int) -> dict:
  """Times the peer of operator `name` (forward + backward) at [B, T, H, D]."""
  if name not in OPERATOR_PEER_MODULES:
    raise ValueError(f'operator {name!r} has no peer; peers exist for {sorted(OPERATOR_PEER_MODULES)}')
  module = importlib.import_module(f'experiments.peers.{OPERATOR_PEER_MODULES[name]}')
  return module.benchmark_operator(batch, seq_len, heads, head_dim, num_steps)
