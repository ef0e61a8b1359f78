"""flash-linear-attention's Triton `chunk_rwkv6`: the peer of our wkv operator (benchmark.py --mode=op --op=wkv).

Same inputs as trainers/measure_ops.py: r, k, v [B, T, H, D] bf16, log decay
w = log_sigmoid(N(0, 1)), bonus u [H, D]; scale=1 as ours; forward + backward.
"""
import statistics

import torch
from fla.ops.rwkv6 import chunk_rwkv6


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
