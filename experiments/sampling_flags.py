"""Flags shared by the sampling binaries (sample, sample_recurrentgemma): the prompts and how to sample."""
from absl import flags

PROMPTS = flags.DEFINE_multi_string('prompt', ['def '], 'Prompt text (repeat the flag for a batch).')
MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate at most.', lower_bound=1)
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 = greedy.', lower_bound=0.0)
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens (0 = all; at most the '
                              "model's vocabulary).", lower_bound=0)
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample among the most likely tokens holding this mass.', lower_bound=0.0,
                            upper_bound=1.0)
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')


def options(vocab_size: int, field: str) -> dict:
  """The sampling options of the flags (`trainers.inference.sampling.generate`'s keywords); a --top_k over the
  model's `vocab_size` (named by `field`) is refused, before anything loads."""
  if _TOP_K.value > vocab_size:
    raise ValueError(f"--top_k={_TOP_K.value}: more than the model's {vocab_size} tokens ({field}); 0 samples "
                     'among all of them')
  return dict(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)


def print_completions(texts: list[bytes]) -> None:
  """Prints each prompt of --prompt followed by its continuation in `texts` (UTF-8; bad bytes as U+FFFD)."""
  for prompt, text in zip(PROMPTS.value, texts):
    print(f"--- {prompt!r}\n{prompt}{text.decode('utf-8', errors='replace')}\n")
