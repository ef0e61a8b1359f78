"""Evaluates a trained checkpoint: python -m experiments.evaluate --config=... --workdir=DIR

Writes DIR/eval.json: loss (nats/token), perplexity, bits per byte on the
held-out split, and the unigram entropy of the training corpus for scale.
"""
import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import distributed_flags

from trainers.evaluator import evaluate_checkpoint
from trainers.logs import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:size].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory the model was trained in.', required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')
_SPLIT = flags.DEFINE_string('split', 'validation', 'Dataset split.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', None, 'Batches to evaluate (default: the whole split).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  distributed_flags.maybe_initialize()
  results = evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, step=_STEP.value, split=_SPLIT.value,
                                num_batches=_NUM_BATCHES.value)
  if jax.process_index() == 0:
    path = os.path.join(_WORKDIR.value, 'eval.json')
    with open(path, 'w') as f:
      json.dump(results, f, indent=2)
    logging.info('wrote %s: %s', path, results)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
