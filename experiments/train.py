"""Trains a model: python -m experiments.train --config=experiments/configs/transformer.py:tiny --workdir=DIR

Resumes from DIR's last checkpoint if there is one; writes DIR/metrics.jsonl
and DIR/checkpoints/. Override any field with --config.<field>=<value>.
--restart starts a new model in DIR, moving the earlier run's files to
DIR/earlier_runs/<k>/ (a DIR whose checkpoints are all corrupt needs it).
"""
from absl import app, flags
from ml_collections import config_flags

from experiments import distributed_flags, flag_parsing

from trainers.logs import quiet_library_logs
from trainers.train_loop import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:size].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.', required=True)
_RESTART = flags.DEFINE_bool('restart', False, "Start a new model in --workdir; the earlier run's files (config, "
                             'metrics, evaluations, checkpoints) move to <workdir>/earlier_runs/<k>/.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  distributed_flags.maybe_initialize()
  train(_CONFIG.value, _WORKDIR.value, restart=_RESTART.value)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  flag_parsing.run(main)
