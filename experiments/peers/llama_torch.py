"""transformers' LlamaForCausalLM of our Transformer's shape in PyTorch: the Transformer peer.

Training (`benchmark`): SDPA attention, `torch.compile` of the whole step, bf16
autocast over float32 parameters, fused AdamW; rows of random bytes (no document
mask: the peer attends across documents, so it is timed only against ours at one
document a row, `benchmark --peer --docs_per_row=1`).
Decoding (`decode_peer`): `generate` as transformers documents it for speed, bf16
weights and a static KV cache, with which generate compiles its forward pass
itself (torch.compile, CUDA graphs), greedy.
"""
import statistics
import time

import torch
import transformers

from experiments.peers.torch_generate import GenerateTimer


def llama_config(config, max_positions: int) -> transformers.LlamaConfig:
  model_config = config.model
  llama = transformers.LlamaConfig(
      vocab_size=model_config.vocab_size, hidden_size=model_config.dim, intermediate_size=model_config.mlp_dim,
      num_hidden_layers=model_config.num_layers, num_attention_heads=model_config.num_heads,
      num_key_value_heads=model_config.num_kv_heads or model_config.num_heads,
      max_position_embeddings=max_positions, tie_word_embeddings=model_config.tie_embeddings)
  llama._attn_implementation = 'sdpa'
  return llama


def benchmark(config, num_steps: int, warmup: int, docs_per_row: int = 1) -> dict:
  """Times the training step on rows of one document (it attends across documents: docs_per_row must be 1)."""
  if docs_per_row != 1:
    raise ValueError(f'the Llama peer attends across documents: docs_per_row={docs_per_row} must be 1')
  model = transformers.LlamaForCausalLM(llama_config(config, config.seq_len)).cuda()
  optimizer = torch.optim.AdamW(model.parameters(), lr=config.optimizer.learning_rate,
                                weight_decay=config.optimizer.weight_decay, fused=True)
  tokens = torch.randint(0, 256, (config.batch_size, config.seq_len + 1), device='cuda')

  def step():
    with torch.autocast('cuda', dtype=torch.bfloat16):
      logits = model(tokens[:, :-1]).logits
      loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  step = torch.compile(step)
  start = time.perf_counter()
  step()
  torch.cuda.synchronize()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(warmup + num_steps):
    start = time.perf_counter()
    loss = step()
    torch.cuda.synchronize()
    if i >= warmup:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return dict(peer='transformers Llama, SDPA, torch.compile, bf16 autocast, fused AdamW', compile_s=compile_s,
              step_s=step_s, tokens_per_s=config.batch_size * config.seq_len / step_s,
              params=sum(p.numel() for p in model.parameters()), peak_memory_bytes=torch.cuda.max_memory_allocated(),
              final_loss=float(loss))


def decode_peer(config, max_context: int) -> GenerateTimer:
  """`LlamaForCausalLM.generate` with a static cache and the compiled forward, on the GPU."""
  model = transformers.LlamaForCausalLM(llama_config(config, max_context)).to('cuda', torch.bfloat16).eval()
  return GenerateTimer('transformers Llama generate, static cache (its automatic torch.compile), bf16', model,
                       static_cache=True)
