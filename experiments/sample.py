"""Generates text from a trained checkpoint with the model's decode cache.

  python -m experiments.sample --workdir=DIR \\
      --prompt='def main(' --prompt='import ' --max_new_tokens=200 --temperature=0.8 --top_p=0.95

Uses the config DIR's run was started with (DIR/config.json) and its tokenizer
(bytes, or DIR/tokenizer.model); a --config whose model or tokenizer differs
from them is refused. Prompts of different lengths are generated
together (left-padded); each stops at the end-of-document token or after
--max_new_tokens. Prints the text; changes nothing in DIR (it may run beside a
trainer). A --top_k over the model's vocabulary is refused before it loads.
"""
import jax
from absl import flags
from flax import nnx
from ml_collections import config_flags

from experiments import distributed_flags, flag_parsing, sampling_flags
from trainers import tokenizer as tokenizer_lib
from trainers.checkpoints import read_checkpoint
from trainers.experiment import Experiment
from trainers.inference.sampling import generate_text
from trainers.run_config import config_for

_CONFIG = config_flags.DEFINE_config_file('config', None, "Experiment config file[:size] (default: the workdir's).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory the model was trained in.', required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest usable).')


def main():
  distributed_flags.maybe_initialize()
  config = config_for(_WORKDIR.value, _CONFIG.value, check_dataset=False)
  options = sampling_flags.options(config.model.vocab_size, 'config.model.vocab_size')
  exp = Experiment.build(config)
  with exp.activate():
    _, state, _ = read_checkpoint(_WORKDIR.value, exp.restore_target(), _STEP.value)
  model = nnx.merge(exp.graphdef, jax.device_get(state.params))
  sampling_flags.print_completions(generate_text(
      model, tokenizer_lib.from_config(config), sampling_flags.PROMPTS.value, sampling_flags.MAX_NEW_TOKENS.value,
      cache_dtype=jax.numpy.dtype(config.model.dtype), prefill_chunk=config.get('prefill_chunk', 0), **options))


if __name__ == '__main__':
  flag_parsing.run(main)
