"""Trains a model: python -m experiments.train --config=experiments/configs/transformer.py:tiny --workdir=DIR

Resumes from DIR's last checkpoint if there is one; writes DIR/metrics.jsonl
and DIR/checkpoints/. Override any field with --config.<field>=<value>.
--restart starts a new model in DIR, moving the earlier run's files to
DIR/earlier_runs/<k>/ (a DIR whose checkpoints are all corrupt needs it).
DIR may be on any filesystem etils.epath knows (gs://...). One trainer holds
DIR at a time (DIR/lock); --force_unlock takes the lock of one that is gone
from another host.
"""
from absl import flags
from ml_collections import config_flags

from experiments import distributed_flags, flag_parsing

from trainers.training.train_loop import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:size].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.', required=True)
_RESTART = flags.DEFINE_bool('restart', False, "Start a new model in --workdir; the earlier run's files (config, "
                             'tokenizer, metrics, evaluations, checkpoints) move to <workdir>/earlier_runs/<k>/.')
_FORCE_UNLOCK = flags.DEFINE_bool('force_unlock', False, "Take over --workdir's lock from a trainer that no longer "
                                  'runs (needed only for one on another host; a dead local one is detected).')


def main():
  distributed_flags.maybe_initialize()
  train(_CONFIG.value, _WORKDIR.value, restart=_RESTART.value, force_unlock=_FORCE_UNLOCK.value)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  flag_parsing.run(main)
