"""Peer implementations timed beside ours by `experiments/benchmark.py --peer` (same shape, same run).

  griffin      recurrentgemma's own JAX Griffin (peers/recurrentgemma_griffin.py)
  transformer  transformers' LlamaForCausalLM, SDPA + torch.compile + fused AdamW (peers/llama_torch.py)

Each peer module is imported only when asked for: they need packages (recurrentgemma,
torch, transformers) that the project itself does not depend on.
"""
import importlib

PEER_MODULES = {'griffin': 'recurrentgemma_griffin', 'transformer': 'llama_torch'}


def benchmark_peer(config, num_steps: int, warmup: int) -> dict:
  """Times the peer of `config.model.name` at the config's shape, batch and length."""
  family = config.model.name
  if family not in PEER_MODULES:
    raise ValueError(f'config.model.name={family!r} has no peer; peers exist for {sorted(PEER_MODULES)}')
  module = importlib.import_module(f'experiments.peers.{PEER_MODULES[family]}')
  return module.benchmark(config, num_steps, warmup)
