"""flash-linear-attention (fla) as the peer of our RWKV-6.

`benchmark_operator`: its Triton `chunk_rwkv6`, the peer of our wkv operator
(benchmark.py --mode=op --op=wkv). Same inputs as trainers/measurement/op_speed.py: r, k,
v [B, T, H, D] bf16, log decay w = log_sigmoid(N(0, 1)), bonus u [H, D]; scale=1
as ours; forward + backward.
`DecodePeer`: its RWKV-6 language model decoding with `generate` (the Finch peer
of benchmark.py --mode=decode).
"""
import statistics

import torch
from fla.ops.rwkv6 import chunk_rwkv6

from experiments.peers.torch_generate import GenerateTimer


def benchmark_operator(batch: int, seq_len: int, heads: int, head_dim: int, num_steps: int) -> dict:
  shape = (batch, seq_len, heads, head_dim)
  r, k, v = (torch.randn(shape, device='cuda', dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
  w = torch.nn.functional.logsigmoid(torch.randn(shape, device='cuda')).to(torch.bfloat16).requires_grad_()
  u = torch.randn(heads, head_dim, device='cuda', dtype=torch.bfloat16, requires_grad=True)
  dy = torch.randn(shape, device='cuda', dtype=torch.bfloat16)

  def step():
    y, _ = chunk_rwkv6(r, k, v, w, u, scale=1.0)
    y.backward(dy)

  for _ in range(3):
    step()
  times = []
  for _ in range(num_steps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
  return dict(peer='flash-linear-attention chunk_rwkv6 (Triton)', fwd_bwd_s=statistics.median(times))


def decode_peer(config, max_context: int) -> GenerateTimer:
  """fla's RWKV-6 language model (RWKV6ForCausalLM) at our Finch config's shape, bf16, decoding with its
  `generate` (the prompt in chunks, then its fused recurrent kernel per new token)."""
  from fla.models import RWKV6Config, RWKV6ForCausalLM
  model = config.model
  if model.gold_layers != 0 or model.time_mix != 'finch':
    raise ValueError('the fla RWKV-6 decode peer serves Finch configs (config.model.gold_layers=0, '
                     "time_mix='finch'), e.g. experiments/configs/finch.py")
  rwkv = RWKV6Config(hidden_size=model.dim, num_hidden_layers=model.num_layers, num_heads=model.dim // model.head_dim,
                     expand_k=1.0, expand_v=1.0, hidden_ratio=3.5, proj_low_rank_dim=model.mix_lora_rank,
                     gate_low_rank_dim=model.decay_lora_rank, vocab_size=model.vocab_size,
                     max_position_embeddings=max_context, fuse_cross_entropy=False)
  return GenerateTimer('flash-linear-attention RWKV6ForCausalLM.generate (Triton), bf16',
                       RWKV6ForCausalLM(rwkv).to('cuda', torch.bfloat16).eval())
