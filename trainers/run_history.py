"""An earlier run's history is never overwritten by a new start in the same workdir.

A start that finds no checkpoint to resume from, in a workdir whose
checkpoints were all set aside as corrupt, refuses (`EarlierRunError`) until
asked for a new run (`experiments.train --restart`); a new run moves the
earlier run's files (config, metrics, evaluations, checkpoints, TensorBoard
events, profiles) into `<workdir>/earlier_runs/<k>/` (`set_aside_earlier_run`).
Metrics of a run that never saved a checkpoint (killed before its first one)
are moved there too, with a warning, rather than truncated. A workdir that a
failed start created and left without a checkpoint or a metrics record is
removed (`remove_if_unused`).
"""
import glob
import json
import os
import shutil

import jax
from absl import logging
from jax.experimental import multihost_utils

from trainers.run_config import FILENAME

EARLIER_RUNS = 'earlier_runs'
RUN_FILES = (FILENAME, 'metrics.jsonl', 'eval*.json', 'tensorboard', 'profile', 'checkpoints')
HISTORY_FILES = ('metrics.jsonl', 'eval*.json', 'tensorboard', 'profile')  # what a run writes besides checkpoints


class EarlierRunError(RuntimeError):
  """The workdir holds an earlier run that a new model would be started over."""


def _present(workdir: str, patterns: tuple[str, ...]) -> list[str]:
  return sorted(p for pattern in patterns for p in glob.glob(os.path.join(glob.escape(workdir), pattern)))


def _metrics_summary(workdir: str) -> str | None:
  """'N records up to step S' of the workdir's metrics.jsonl, or None if it has none."""
  steps = []
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      for line in f:
        try:
          steps.append(int(json.loads(line)['step']))
        except (ValueError, KeyError, TypeError):
          continue  # a line cut by a kill
  except FileNotFoundError:
    return None
  return f'{len(steps)} records up to step {max(steps)}' if steps else None


def set_aside_earlier_run(workdir: str, patterns: tuple[str, ...] = RUN_FILES) -> str | None:
  """Moves the files of `patterns` into <workdir>/earlier_runs/<k>/ (k: the next free number); returns it."""
  present = _present(workdir, patterns)
  target = None
  if present:
    taken = [int(n) for n in os.listdir(os.path.join(workdir, EARLIER_RUNS))
             if n.isdigit()] if os.path.isdir(os.path.join(workdir, EARLIER_RUNS)) else []
    target = os.path.join(workdir, EARLIER_RUNS, str(max(taken, default=0) + 1))
    if jax.process_index() == 0:
      os.makedirs(target)
      for path in present:
        os.rename(path, os.path.join(target, os.path.basename(path)))
      logging.warning('moved the earlier run of %s (%s) to %s', workdir,
                      ', '.join(os.path.basename(p) for p in present), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('set aside the earlier run')
  return target


def before_fresh_start(workdir: str, corrupt: list[str]) -> None:
  """Called when there is no checkpoint to resume from: refuses if checkpoints were set aside as `corrupt`,
  else moves the history of a run that never saved a checkpoint out of the new run's way."""
  history = _metrics_summary(workdir)
  if jax.process_count() > 1:  # every process has read the workdir before process 0 moves anything
    multihost_utils.sync_global_devices('read the workdir before a fresh start')
  if corrupt:
    raise EarlierRunError(
        f'{workdir} holds an earlier run whose checkpoints were all set aside as corrupt ({", ".join(corrupt)}'
        f'{"; metrics.jsonl has " + history if history else ""}); refusing to start a new model over it. '
        f'Pass --restart to experiments.train (train(..., restart=True)) to start a new run here: the earlier '
        f"run's files move to {os.path.join(workdir, EARLIER_RUNS)}/<k>/. Or use another --workdir.")
  if history:
    logging.warning('%s has metrics (%s) but no checkpoint: that run never saved one; keeping its history',
                    workdir, history)
    set_aside_earlier_run(workdir, HISTORY_FILES)


def remove_if_unused(workdir: str) -> None:
  """Removes `workdir` (which this process created) if it holds neither a checkpoint nor a metrics record."""
  checkpoints = os.path.join(workdir, 'checkpoints')
  saved = os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))
  if jax.process_index() == 0 and os.path.isdir(workdir) and not saved and _metrics_summary(workdir) is None:
    shutil.rmtree(workdir, ignore_errors=True)
    logging.info('removed %s: this failed start created it and wrote nothing to keep', workdir)
