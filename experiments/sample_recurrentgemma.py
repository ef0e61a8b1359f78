"""Generates text from recurrentgemma weights (the released RecurrentGemma models, or any recurrentgemma
Griffin checkpoint), ported into our Griffin by architectures/griffin_convert.py, with their tokenizer:

  python -m experiments.sample_recurrentgemma --checkpoint=DIR/2b --tokenizer=DIR/tokenizer.model \\
      --prompt='The capital of France is' --temperature=0

--checkpoint: recurrentgemma's orbax checkpoint of the parameters (the released 2b / 9b folders, what
recurrentgemma.jax.load_parameters reads and utils.save_parameters writes). --tokenizer: the released
SentencePiece model file (Gemma's tokenizer.model; any SentencePiece model whose vocabulary the embedding
covers). Each prompt starts with the tokenizer's BOS, as recurrentgemma's sampler starts it; generation stops at
its EOS. The parameter shapes give every model field but the attention window (--window: recurrentgemma's
attention_window_size, 2048 for the released models) and what the 2B and 9B models share (scaled embeddings,
logits soft cap 30). A --top_k over the vocabulary, or a tokenizer larger than it, is refused before the
weights are ported.
"""
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags

from architectures import griffin_convert
from experiments import flag_parsing, sampling_flags
from trainers import paths
from trainers import tokenizer as tokenizer_lib
from trainers.inference.sampling import generate_text

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, "recurrentgemma's orbax checkpoint of the parameters.",
                                  required=True)
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'The SentencePiece model file released with the weights '
                                 "(tokenizer.model), or 'bytes'.", required=True)
_WINDOW = flags.DEFINE_integer('window', 2048, "recurrentgemma's attention_window_size (the released models': "
                               '2048).', lower_bound=1)
_DTYPE = flags.DEFINE_string('dtype', 'bfloat16', 'dtype of the parameters, the computation and the cache.')
_PREFILL_CHUNK = flags.DEFINE_integer('prefill_chunk', 0, 'Prompt tokens per prefill call (0 = all at once).',
                                      lower_bound=0)


def restore_parameters(checkpoint: str) -> dict:
  """recurrentgemma's parameter tree from its orbax checkpoint, as numpy arrays (on no device yet)."""
  checkpointer = ocp.PyTreeCheckpointer()
  path = paths.as_path(checkpoint)
  structure = checkpointer.metadata(path).item_metadata.tree
  return checkpointer.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                                              structure))


def main():
  tokenizer = tokenizer_lib.load(_TOKENIZER.value, '--tokenizer')
  params = restore_parameters(_CHECKPOINT.value)
  vocab_size = griffin_convert.config_fields_from_reference(params, reference_window=_WINDOW.value)['vocab_size']
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f'--tokenizer={_TOKENIZER.value!r}: {tokenizer.vocab_size} pieces, more than the '
                     f"{vocab_size} rows of --checkpoint's embedding")
  options = sampling_flags.options(vocab_size, "--checkpoint's embedding")
  model = griffin_convert.model_from_reference(params, reference_window=_WINDOW.value, dtype=_DTYPE.value,
                                               param_dtype=_DTYPE.value)
  sampling_flags.print_completions(generate_text(
      model, tokenizer, sampling_flags.PROMPTS.value, sampling_flags.MAX_NEW_TOKENS.value, bos=True,
      cache_dtype=jax.numpy.dtype(_DTYPE.value), prefill_chunk=_PREFILL_CHUNK.value, **options))


if __name__ == '__main__':
  flag_parsing.run(main)
