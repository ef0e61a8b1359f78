"""Generates text from a trained checkpoint with the model's decode cache.

  python -m experiments.sample --workdir=DIR \\
      --prompt='def main(' --prompt='import ' --max_new_tokens=200 --temperature=0.8 --top_p=0.95

Uses the config DIR's run was started with (DIR/config.json); a --config whose
model differs from it is refused. Prompts of different lengths are generated
together (left-padded); each stops at the end-of-document token or after
--max_new_tokens. Prints the text; changes nothing in DIR (it may run beside a
trainer). A --top_k over the model's vocabulary is refused before it loads.
"""
import jax
from absl import flags
from flax import nnx
from ml_collections import config_flags

from experiments import distributed_flags, flag_parsing
from trainers.checkpoints import read_checkpoint
from trainers.experiment import Experiment
from trainers.inference.sampling import generate
from trainers.run_config import config_for
from trainers.tokenizer import ByteTokenizer

_CONFIG = config_flags.DEFINE_config_file('config', None, "Experiment config file[:size] (default: the workdir's).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory the model was trained in.', required=True)
_PROMPTS = flags.DEFINE_multi_string('prompt', ['def '], 'Prompt text (repeat the flag for a batch).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate at most.', lower_bound=1)
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 = greedy.', lower_bound=0.0)
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens (0 = all; at most the '
                              "model's vocabulary).", lower_bound=0)
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample among the most likely tokens holding this mass.', lower_bound=0.0,
                            upper_bound=1.0)
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest usable).')


def main():
  distributed_flags.maybe_initialize()
  config = config_for(_WORKDIR.value, _CONFIG.value, check_dataset=False)
  if _TOP_K.value > config.model.vocab_size:
    raise ValueError(f"--top_k={_TOP_K.value}: more than the model's {config.model.vocab_size} tokens "
                     '(config.model.vocab_size); 0 samples among all of them')
  exp = Experiment.build(config)
  with exp.activate():
    _, state, _ = read_checkpoint(_WORKDIR.value, exp.restore_target(), _STEP.value)
  model = nnx.merge(exp.graphdef, jax.device_get(state.params))
  tokenizer = ByteTokenizer()
  prompts = [tokenizer.encode(p) for p in _PROMPTS.value]
  outputs = generate(model, prompts, _MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                     top_p=_TOP_P.value, eos_id=tokenizer.eos_id, seed=_SEED.value,
                     cache_dtype=jax.numpy.dtype(config.model.dtype), prefill_chunk=config.get('prefill_chunk', 0))
  for prompt, tokens in zip(_PROMPTS.value, outputs):
    print(f'--- {prompt!r}\n{prompt}{tokenizer.decode(tokens)}\n')


if __name__ == '__main__':
  flag_parsing.run(main)
