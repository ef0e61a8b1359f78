"""Peer implementations timed beside ours by `experiments/benchmark.py --peer` (same shape, same run).

  griffin      recurrentgemma's own JAX Griffin (peers/recurrentgemma_griffin.py), on our rows and their
               document boundaries; decoding: its Sampler
  transformer  transformers' LlamaForCausalLM, SDPA + torch.compile + fused AdamW (peers/llama_torch.py),
               attending across documents: timed at one document a row only (--docs_per_row=1);
               decoding: its `generate` with a static cache and torch.compile
  goldfinch    decoding, Finch configs: flash-linear-attention's RWKV6ForCausalLM.generate (peers/fla_rwkv6.py)
  op wkv       flash-linear-attention's Triton chunk_rwkv6 (peers/fla_rwkv6.py)

Each peer module is imported only when asked for: they need packages (recurrentgemma,
torch, transformers, fla) that the project itself does not depend on.
"""
import gc
import importlib
import sys

import jax
from absl import logging

from trainers.measurement.decode_speed import MEMORY_HEADROOM, device_memory_limit, largest_batch

PEER_MODULES = {'griffin': 'recurrentgemma_griffin', 'transformer': 'llama_torch'}
DECODE_PEER_MODULES = {'griffin': 'recurrentgemma_griffin', 'transformer': 'llama_torch', 'goldfinch': 'fla_rwkv6'}
OPERATOR_PEER_MODULES = {'wkv': 'fla_rwkv6'}
# Training peers that take our rows' positions, and so the document boundaries: recurrentgemma's Griffin
# masks its local attention to each document (segment ids from position 0) and resets its recurrence at
# position 0. The others (transformers' Llama) attend across documents: equal work only at one a row.
PEERS_WITH_DOCUMENTS = frozenset({'griffin'})


def peer_docs_per_row(family: str, docs_per_row: int) -> int:
  """The documents a row the training peer of `family` is timed at, for our rows of `docs_per_row`:
  the same where the peer takes the document boundaries; a peer that attends across documents does the
  same work as ours only at one document a row, so any other `docs_per_row` is refused (ValueError)."""
  if family in PEERS_WITH_DOCUMENTS or docs_per_row == 1:
    return docs_per_row
  raise ValueError(f'--peer with --docs_per_row={docs_per_row}: the {family} peer attends across documents, '
                   'so it does the same work as ours only at one document a row; pass --docs_per_row=1')


def benchmark_peer(config, num_steps: int, warmup: int, docs_per_row: int = 1) -> dict:
  """Times the peer of `config.model.name` at the config's shape, batch and length, on rows of
  `docs_per_row` documents (peer_docs_per_row); the result records them as `docs_per_row`."""
  family = config.model.name
  if family not in PEER_MODULES:
    raise ValueError(f'config.model.name={family!r} has no peer; peers exist for {sorted(PEER_MODULES)}')
  docs_per_row = peer_docs_per_row(family, docs_per_row)
  module = importlib.import_module(f'experiments.peers.{PEER_MODULES[family]}')
  return dict(module.benchmark(config, num_steps, warmup, docs_per_row=docs_per_row), docs_per_row=docs_per_row)


def benchmark_operator_peer(name: str, batch: int, seq_len: int, heads: int, head_dim: int, num_steps: int) -> dict:
  """Times the peer of operator `name` (forward + backward) at [B, T, H, D]."""
  if name not in OPERATOR_PEER_MODULES:
    raise ValueError(f'operator {name!r} has no peer; peers exist for {sorted(OPERATOR_PEER_MODULES)}')
  module = importlib.import_module(f'experiments.peers.{OPERATOR_PEER_MODULES[name]}')
  return module.benchmark_operator(batch, seq_len, heads, head_dim, num_steps)


def benchmark_decode_peer(config, contexts: list[int], batches: list[int], new_tokens: int, repeats: int,
                          max_batch: bool) -> list[dict]:
  """The family's decode peer at each context and batch, and (max_batch) at the largest batch it fits at
  each context. Run before ours: a PyTorch peer's memory is returned to the device when it is done."""
  family = config.model.name
  if family not in DECODE_PEER_MODULES:
    raise ValueError(f'config.model.name={family!r} has no decode peer; peers exist for {sorted(DECODE_PEER_MODULES)}')
  module = importlib.import_module(f'experiments.peers.{DECODE_PEER_MODULES[family]}')
  rows = _decode_rows(module.decode_peer(config, max(contexts)), contexts, batches, new_tokens, repeats, max_batch)
  _release_torch_memory()  # the peer model is gone with _decode_rows' frame
  return rows


def _decode_rows(peer, contexts: list[int], batches: list[int], new_tokens: int, repeats: int,
                 max_batch: bool) -> list[dict]:
  limit = peer_memory_limit()
  rows = []
  for context in contexts:
    sizes = [(batch, False) for batch in batches]
    if max_batch:
      sizes.append((largest_batch(lambda b: _bytes_or_inf(peer, context, b, new_tokens), limit,
                                  f'{peer.name} at context {context}'), True))
    for batch, largest in sizes:
      row = dict(peer=peer.name, context=context, batch=batch, largest_batch=largest)
      try:
        row.update(peer.decode_point(context, batch, new_tokens, repeats))
        row['decode_tokens_per_s'] = batch / row['decode_s_per_token'] if row['decode_s_per_token'] else None
      except MemoryError as e:
        row['error'] = str(e)
      logging.info('peer decode %s', row)
      rows.append(row)
  return rows


def _bytes_or_inf(peer, context: int, batch: int, new_tokens: int) -> float:
  try:
    return peer.decode_bytes(context, batch, new_tokens)
  except MemoryError:
    return float('inf')


def peer_memory_limit() -> int:
  """Bytes a peer may use on the first GPU: what the device reports, less the same headroom as ours."""
  if 'torch' in sys.modules and sys.modules['torch'].cuda.is_available():
    return int(sys.modules['torch'].cuda.mem_get_info()[1] * MEMORY_HEADROOM)
  return device_memory_limit(jax.devices()[0])


def _release_torch_memory() -> None:
  if 'torch' in sys.modules and sys.modules['torch'].cuda.is_available():
    gc.collect()
    sys.modules['torch'].cuda.empty_cache()


def with_peer_ratios(ours: list[dict], peer: list[dict]) -> None:
  """Adds `ratio_to_peer` (our decode tokens/s over the peer's) to each of our rows with a peer row at the
  same context and batch, or at the same context when both are each one's largest batch."""
  for row in ours:
    for other in peer:
      same = other['context'] == row['context'] and (
          other['batch'] == row['batch'] if not row['largest_batch'] else other['largest_batch'])
      if same and other.get('decode_tokens_per_s') and row.get('decode_tokens_per_s'):
        row['ratio_to_peer'] = row['decode_tokens_per_s'] / other['decode_tokens_per_s']
