"""Evaluates a trained checkpoint: python -m experiments.evaluate --workdir=DIR [--step=S]

Uses the config DIR's run was started with (DIR/config.json). A --config
(with overrides) may replace it, but one whose model or dataset differs from
the recorded one is refused (--other_dataset lets the dataset differ).

It reads the newest finished checkpoint (or --step) and changes nothing else in
DIR, so it may run beside a trainer; if the files of a local corpus changed
since training, it evaluates the build the run trained on (or refuses where
that build is gone), never a split of the changed files.

Writes DIR/eval_<step>.json and, unless it holds a newer step, DIR/eval.json:
the checkpoint step, the dataset (name, path, build, documents, overlap of the
validation split with training), loss (nats/token), perplexity, bits per byte
on the held-out split, loss by position, longer rows, task scores, and the
unigram entropy of the training corpus for scale. Logs its progress.
"""
import jax
from absl import flags, logging
from ml_collections import config_flags

from experiments import distributed_flags, flag_parsing

from trainers.run_config import config_for
from trainers.training.evaluator import evaluate_checkpoint, write_results

_CONFIG = config_flags.DEFINE_config_file('config', None, "Experiment config file[:size] (default: the workdir's).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory the model was trained in.', required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')
_SPLIT = flags.DEFINE_string('split', 'validation', 'Dataset split.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', None, 'Batches to evaluate (default: the whole split).')
_OTHER_DATASET = flags.DEFINE_bool('other_dataset', False, "Evaluate on --config's dataset where it differs from "
                                   'the one the workdir was trained on.')


def main():
  distributed_flags.maybe_initialize()
  config = config_for(_WORKDIR.value, _CONFIG.value, check_dataset=not _OTHER_DATASET.value,
                      data_flag='--other_dataset')
  results = evaluate_checkpoint(config, _WORKDIR.value, step=_STEP.value, split=_SPLIT.value,
                                num_batches=_NUM_BATCHES.value, progress=True)
  if jax.process_index() == 0:
    paths = write_results(_WORKDIR.value, results)
    logging.info('wrote %s: loss %.4f, %s', ' and '.join(paths), results['loss'],
                 ', '.join(f'{k} {results[k]:.4f}' for k in ('bits_per_byte', 'mae') if k in results))


if __name__ == '__main__':
  flag_parsing.run(main)
