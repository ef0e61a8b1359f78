"""An earlier run's history is never overwritten by a new start in the same workdir.

A start that finds no checkpoint to resume from, in a workdir whose
checkpoints were all set aside as corrupt, refuses (`EarlierRunError`) until
asked for a new run (`experiments.train --restart`); a new run moves the
earlier run's files (config, tokenizer, metrics, evaluations, checkpoints,
TensorBoard events, profiles) into `<workdir>/earlier_runs/<k>/` (`set_aside_earlier_run`).
Metrics of a run that never saved a checkpoint (killed before its first one)
are moved there too, with a warning, rather than truncated. A workdir that a
failed start created and left without a checkpoint or a metrics record is
removed (`remove_if_unused`).
"""
import fnmatch
import json

import jax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from trainers import paths
from trainers.run_config import FILENAME, TOKENIZER_FILENAME

EARLIER_RUNS = 'earlier_runs'
RUN_FILES = (FILENAME, TOKENIZER_FILENAME, 'metrics.jsonl', 'eval*.json', 'tensorboard', 'profile', 'checkpoints')
HISTORY_FILES = ('metrics.jsonl', 'eval*.json', 'tensorboard', 'profile')  # what a run writes besides checkpoints


class EarlierRunError(RuntimeError):
  """The workdir holds an earlier run that a new model would be started over."""


def _present(workdir: epath.Path, patterns: tuple[str, ...]) -> list[epath.Path]:
  if not workdir.is_dir():
    return []
  return sorted((p for p in workdir.iterdir() if any(fnmatch.fnmatchcase(p.name, pattern) for pattern in patterns)),
                key=str)


def _metrics_summary(workdir: epath.Path) -> str | None:
  """'N records up to step S' of the workdir's metrics.jsonl, or None if it has none."""
  steps = []
  try:
    lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  except FileNotFoundError:
    return None
  for line in lines:
    try:
      steps.append(int(json.loads(line)['step']))
    except (ValueError, KeyError, TypeError):
      continue  # a line cut by a kill
  return f'{len(steps)} records up to step {max(steps)}' if steps else None


def set_aside_earlier_run(workdir: str | epath.Path, patterns: tuple[str, ...] = RUN_FILES) -> epath.Path | None:
  """Moves the files of `patterns` into <workdir>/earlier_runs/<k>/ (k: the next free number); returns it."""
  workdir = paths.as_path(workdir)
  present = _present(workdir, patterns)
  target = None
  if present:
    earlier = workdir / EARLIER_RUNS
    taken = [int(p.name) for p in earlier.iterdir() if p.name.isdigit()] if earlier.is_dir() else []
    target = earlier / str(max(taken, default=0) + 1)
    if jax.process_index() == 0:
      target.mkdir(parents=True)
      for path in present:
        path.rename(target / path.name)
      logging.warning('moved the earlier run of %s (%s) to %s', workdir, ', '.join(p.name for p in present), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('set aside the earlier run')
  return target


def before_fresh_start(workdir: str | epath.Path, corrupt: list[str]) -> None:
  """Called when there is no checkpoint to resume from: refuses if checkpoints were set aside as `corrupt`,
  else moves the history of a run that never saved a checkpoint out of the new run's way."""
  workdir = paths.as_path(workdir)
  history = _metrics_summary(workdir)
  if jax.process_count() > 1:  # every process has read the workdir before process 0 moves anything
    multihost_utils.sync_global_devices('read the workdir before a fresh start')
  if corrupt:
    raise EarlierRunError(
        f'{workdir} holds an earlier run whose checkpoints were all set aside as corrupt ({", ".join(corrupt)}'
        f'{"; metrics.jsonl has " + history if history else ""}); refusing to start a new model over it. '
        f'Pass --restart to experiments.train (train(..., restart=True)) to start a new run here: the earlier '
        f"run's files move to {workdir / EARLIER_RUNS}/<k>/. Or use another --workdir.")
  if history:
    logging.warning('%s has metrics (%s) but no checkpoint: that run never saved one; keeping its history',
                    workdir, history)
    set_aside_earlier_run(workdir, HISTORY_FILES)


def remove_if_unused(workdir: str | epath.Path) -> None:
  """Removes `workdir` (which this process created) if it holds neither a checkpoint nor a metrics record."""
  workdir = paths.as_path(workdir)
  checkpoints = workdir / 'checkpoints'
  saved = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
  if jax.process_index() == 0 and workdir.is_dir() and not saved and _metrics_summary(workdir) is None:
    workdir.rmtree(missing_ok=True)
    logging.info('removed %s: this failed start created it and wrote nothing to keep', workdir)
