"""The config a workdir's run was started with, so that no start silently mixes models
or evaluates the wrong data (what happens to an earlier run's files: run_history.py).

`<workdir>/config.json`: the config of the first start (`record_or_check`,
with config.dataset.path made absolute). A later start compares
`config.model`: fields that change the parameters must match (fields a family
lists in `runtime_fields`, such as the compute dtype or the attention kernel,
may differ), else it refuses to resume and names each difference. `evaluate`
and `sample` use it when given no --config (`config_for`), and refuse a given
config whose model (or, for evaluate, dataset) differs.
"""
import json
import os
from typing import Any

import jax
from etils import epath
from ml_collections import ConfigDict

import architectures
from trainers import paths

FILENAME = 'config.json'
DATASET_RUNTIME_FIELDS = ('data_dir', 'num_threads', 'prefetch')  # where and how fast the data is read, not which


class WorkdirMismatchError(ValueError):
  """The workdir holds a run of a different model (or, for evaluate, data)."""


def recorded(workdir: str | epath.Path) -> ConfigDict | None:
  """The config the workdir's run was started with (lists read back as tuples), or None."""
  path = paths.as_path(workdir) / FILENAME
  if not path.exists():
    return None
  try:
    values = json.loads(path.read_text())
    problem = None if isinstance(values, dict) else f'a JSON {type(values).__name__}, not an object'
  except ValueError as error:
    problem = f'not valid JSON: {error}'
  if problem:
    raise ValueError(f'{path} is {problem}; it records the config of the run in this workdir: restore it (an '
                     'earlier copy may be under earlier_runs/), or use another --workdir')
  return ConfigDict(_tuples(values))


def record_or_check(config: ConfigDict, workdir: str | epath.Path) -> None:
  """Writes config.json on the first start; later, refuses a config.model that differs from it."""
  old = recorded(workdir)
  if old is not None:
    _check(old, config, workdir, ('model',), 'Use a new --workdir, or the recorded config.')
    return
  if jax.process_index() == 0:
    workdir = paths.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    values = config.to_dict()
    if values.get('dataset', {}).get('path'):
      values['dataset']['path'] = _absolute(values['dataset']['path'])
    paths.write_text_atomically(workdir / FILENAME, ConfigDict(values).to_json_best_effort(indent=2, sort_keys=True))


def config_for(workdir: str, given: ConfigDict | None, *, check_dataset: bool, data_flag: str = '') -> ConfigDict:
  """The config to evaluate or sample a workdir's model with: `given` (--config) if set, after checking it
  against the recorded one (model; and dataset if `check_dataset`, which `data_flag` turns off), else the
  recorded one."""
  old = recorded(workdir)
  if given is None:
    if old is None:
      raise FileNotFoundError(f'{paths.as_path(workdir) / FILENAME} does not exist (no run was started in '
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
        f'this config.\n{advice} (It is {paths.as_path(workdir) / FILENAME}.)')
  ignored = {'model': set(architectures.get_family(new_family).Config.runtime_fields),
             'dataset': set(DATASET_RUNTIME_FIELDS)}
  differences = []
  for group in groups:
    before, now = _dotted(old.get(group, ConfigDict()).to_dict()), _dotted(new[group].to_dict())
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


def _dotted(fields: dict, prefix: str = '') -> dict:
  """Nested fields (a hybrid's config blocks) by dotted name: {'rg_lru': {'impl': 'xla'}} -> {'rg_lru.impl': 'xla'}."""
  flat = {}
  for key, value in fields.items():
    flat.update(_dotted(value, f'{prefix}{key}.') if isinstance(value, dict) else {f'{prefix}{key}': value})
  return flat


def _normalise(value: Any) -> Any:
  return list(value) if isinstance(value, tuple) else value


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config files use."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _absolute(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path))
