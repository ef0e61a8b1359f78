"""Trains a model: python -m experiments.train --config=experiments/configs/transformer.py:tiny --workdir=DIR

Resumes from DIR's last checkpoint if there is one; writes DIR/metrics.jsonl
and DIR/checkpoints/. Override any field with --config.<field>=<value>.
"""
from absl import app, flags
from ml_collections import config_flags

from experiments import distributed_flags

from trainers.logs import quiet_library_logs
from trainers.train_loop import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:size].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.', required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  distributed_flags.maybe_initialize()
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
