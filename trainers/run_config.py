"""What a workdir records of its runs, so that no start silently mixes models,
evaluates the wrong data or loses an earlier run's history.

* `<workdir>/config.json`: the config of the first start (`record_or_check`,
  with config.dataset.path made absolute). A later start compares
  `config.model`: fields that change the parameters must match (fields a
  family lists in `runtime_fields`, such as the compute dtype or the attention
  kernel, may differ), else it refuses to resume and names each difference.
  `evaluate` and `sample` use it when given no --config (`config_for`), and
  refuse a given config whose model (or, for evaluate, dataset) differs.
* An earlier run's history is never overwritten. A start that finds no
  checkpoint to resume from, in a workdir whose checkpoints were all set aside
  as corrupt, refuses (`EarlierRunError`) until asked for a new run
  (`experiments.train --restart`); a new run moves the earlier run's files
  (config, metrics, evaluations, checkpoints, TensorBoard events, profiles) into
  `<workdir>/earlier_runs/<k>/` (`set_aside_earlier_run`). Metrics of a run
  that never saved a checkpoint (killed before its first one) are moved there
  too, with a warning, rather than truncated.
* A workdir that a failed start created and left without a checkpoint or a
  metrics record is removed (`remove_if_unused`).
"""
import glob
import json
import os
import shutil
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

import architectures

FILENAME = 'config.json'
EARLIER_RUNS = 'earlier_runs'
RUN_FILES = (FILENAME, 'metrics.jsonl', 'eval*.json', 'tensorboard', 'profile', 'checkpoints')
HISTORY_FILES = ('metrics.jsonl', 'eval*.json', 'tensorboard', 'profile')  # what a run writes besides checkpoints
DATASET_RUNTIME_FIELDS = ('data_dir', 'num_threads', 'prefetch')  # where and how fast the data is read, not which


class WorkdirMismatchError(ValueError):
  """The workdir holds a run of a different model (or, for evaluate, data)."""


class EarlierRunError(RuntimeError):
  """The workdir holds an earlier run that a new model would be started over."""


def recorded(workdir: str) -> ConfigDict | None:
  """The config the workdir's run was started with (lists read back as tuples), or None."""
  path = os.path.join(workdir, FILENAME)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return ConfigDict(_tuples(json.load(f)))


def record_or_check(config: ConfigDict, workdir: str) -> None:
  """Writes config.json on the first start; later, refuses a config.model that differs from it."""
  old = recorded(workdir)
  if old is not None:
    _check(old, config, workdir, ('model',), 'Use a new --workdir, or the recorded config.')
    return
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    values = config.to_dict()
    if values.get('dataset', {}).get('path'):
      values['dataset']['path'] = _absolute(values['dataset']['path'])
    with open(os.path.join(workdir, FILENAME), 'w') as f:
      f.write(ConfigDict(values).to_json_best_effort(indent=2, sort_keys=True))


def config_for(workdir: str, given: ConfigDict | None, *, check_dataset: bool, data_flag: str = '') -> ConfigDict:
  """The config to evaluate or sample a workdir's model with: `given` (--config) if set, after checking it
  against the recorded one (model; and dataset if `check_dataset`, which `data_flag` turns off), else the
  recorded one."""
  old = recorded(workdir)
  if given is None:
    if old is None:
      raise FileNotFoundError(f'{os.path.join(workdir, FILENAME)} does not exist (no run was started in '
                              f'{workdir}, or an old version started it); pass --config')
    return old
  if old is not None:
    _check(old, given, workdir, ('model', 'dataset') if check_dataset else ('model',),
           'Omit --config to use the recorded config.', data_flag)
  return given


def _check(old: ConfigDict, new: ConfigDict, workdir: str, groups: tuple[str, ...], advice: str,
           data_flag: str = '') -> None:
  """Raises WorkdirMismatchError naming both families, or else each differing field of `groups`."""
  old_family, new_family = old.model.get('name'), new.model.name
  if old_family != new_family:
    raise WorkdirMismatchError(
        f'{workdir} holds a run of model family {old_family!r}, not {new_family!r}; refusing to use it with '
        f'this config.\n{advice} (It is {os.path.join(workdir, FILENAME)}.)')
  ignored = {'model': set(architectures.get_family(new_family).Config.runtime_fields),
             'dataset': set(DATASET_RUNTIME_FIELDS)}
  differences = []
  for group in groups:
    before, now = old.get(group, ConfigDict()).to_dict(), new[group].to_dict()
    if group == 'dataset':
      before, now = ({**d, 'path': _absolute(d['path'])} if d.get('path') else d for d in (before, now))
    differences += [f'config.{group}.{key}: {before.get(key, "<unset>")!r} in the workdir, '
                    f'{now.get(key, "<unset>")!r} now'
                    for key in sorted(set(before) | set(now))
                    if key not in ignored[group] and _normalise(before.get(key)) != _normalise(now.get(key))]
  if differences:
    only_data = all(d.startswith('config.dataset.') for d in differences)
    if only_data and data_flag:
      advice = f'{advice[:-1]}, or pass {data_flag} to use the data of --config.'
    raise WorkdirMismatchError(f'{workdir} holds a run of {"other data" if only_data else "a different model"}; '
                               f'refusing to use it with this config. {"; ".join(differences)}. {advice}')


def _normalise(value: Any) -> Any:
  return list(value) if isinstance(value, tuple) else value


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config files use."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _absolute(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path))


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
