"""Times a transformers-style `generate` on the GPU as trainers/measurement/decode_speed.py times our sampler.

The call that prefills the prompt and generates 1 token is the prefill time; (the call generating
1 + n tokens - that call) / n is the time per new token; both after untimed calls that compile.
Running out of memory is a MemoryError naming the batch and context.
"""
import statistics
import time

import torch


class GenerateTimer:
  """`static_cache`: every call of one context and batch reuses one StaticCache of the whole context (reset
  first), so generate compiles its forward (transformers' automatic torch.compile of static caches) once."""

  def __init__(self, name: str, model: torch.nn.Module, static_cache: bool = False):
    self.name, self.model, self.static_cache = name, model, static_cache

  def _seconds(self, input_ids: torch.Tensor, new_tokens: int, cache) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
      extra = {}
      if cache is not None:
        cache.reset()
        extra['past_key_values'] = cache
      self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
    torch.cuda.synchronize()
    return time.perf_counter() - start

  def decode_point(self, context: int, batch: int, new_tokens: int, repeats: int) -> dict:
    input_ids = torch.randint(0, 256, (batch, context - new_tokens - 1), device='cuda')
    torch.cuda.reset_peak_memory_stats()
    try:
      cache = None
      if self.static_cache:
        from transformers import StaticCache
        cache = StaticCache(config=self.model.config, max_cache_len=context)
      for n in (1, 1 + new_tokens):
        self._seconds(input_ids, n, cache)
      prefill_s = statistics.median(self._seconds(input_ids, 1, cache) for _ in range(repeats))
      total_s = statistics.median(self._seconds(input_ids, 1 + new_tokens, cache) for _ in range(repeats))
    except torch.cuda.OutOfMemoryError as e:
      torch.cuda.empty_cache()
      raise MemoryError(f'{self.name} ran out of memory at batch {batch}, context {context}') from e
    return dict(prefill_s=prefill_s, decode_s_per_token=max(total_s - prefill_s, 0.0) / new_tokens,
                program_bytes=torch.cuda.max_memory_allocated())

  def decode_bytes(self, context: int, batch: int, new_tokens: int) -> int:
    return self.decode_point(context, batch, new_tokens, repeats=1)['program_bytes']
