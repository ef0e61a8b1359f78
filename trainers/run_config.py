"""The config a workdir's run was started with, so that no start silently mixes models
or evaluates the wrong data (what happens to an earlier run's files: run_history.py).

`<workdir>/config.json`: the config of the first start (`record_or_check`,
with config.dataset.path and config.tokenizer made absolute), and beside it
`<workdir>/tokenizer.model`, a copy of a SentencePiece config.tokenizer. A
later start compares `config.model`: fields that change the parameters must
match (fields a family lists in `runtime_fields`, such as the compute dtype or
the attention kernel, may differ), else it refuses to resume and names each
difference; and the tokenizer, by its contents (`tokenizer.identity`): another
model file, or bytes instead of one, is refused the same way. `evaluate` and
`sample` use the recorded config when given no --config (`config_for`), and
refuse a given config whose model or tokenizer (or, for evaluate, dataset)
differs; either way they read the workdir's copy of the tokenizer, so they need
nothing outside the workdir.
"""
import json
import os
from typing import Any

import jax
from etils import epath
from ml_collections import ConfigDict

import architectures
from trainers import paths
from trainers import tokenizer as tokenizer_lib

FILENAME = 'config.json'
TOKENIZER_FILENAME = 'tokenizer.model'
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
  """Writes config.json (and the tokenizer's copy) on the first start; later, refuses a config.model or a
  tokenizer that differs from them."""
  old = recorded(workdir)
  if old is not None:
    advice = 'Use a new --workdir, or the recorded config.'
    _check(old, config, workdir, ('model',), advice)
    _check_tokenizer(old, config, workdir, advice)
    return
  if jax.process_index() == 0:
    workdir = paths.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    values = config.to_dict()
    if values.get('dataset', {}).get('path'):
      values['dataset']['path'] = _absolute(values['dataset']['path'])
    tokenizer = tokenizer_lib.from_config(config)
    if tokenizer.identity != tokenizer_lib.BYTES:  # the copy first: a config.json always has its tokenizer
      paths.write_bytes_atomically(workdir / TOKENIZER_FILENAME, tokenizer.model)
      values['tokenizer'] = str(paths.as_path(values['tokenizer']))
    paths.write_text_atomically(workdir / FILENAME, ConfigDict(values).to_json_best_effort(indent=2, sort_keys=True))


def config_for(workdir: str, given: ConfigDict | None, *, check_dataset: bool, data_flag: str = '') -> ConfigDict:
  """The config to evaluate or sample a workdir's model with: `given` (--config) if set, after checking it
  against the recorded one (model and tokenizer; and dataset if `check_dataset`, which `data_flag` turns off),
  else the recorded one; with config.tokenizer the workdir's copy."""
  old = recorded(workdir)
  if given is None:
    if old is None:
      raise FileNotFoundError(f'{paths.as_path(workdir) / FILENAME} does not exist (no run was started in '
                              f'{workdir}, or an old version started it); pass --config')
    return _with_recorded_tokenizer(old, old, workdir)
  if old is None:
    return given
  advice = 'Omit --config to use the recorded config.'
  _check(old, given, workdir, ('model', 'dataset') if check_dataset else ('model',), advice, data_flag)
  _check_tokenizer(old, given, workdir, advice)
  return _with_recorded_tokenizer(given, old, workdir)


def _recorded_tokenizer(old: ConfigDict, workdir: str | epath.Path) -> str:
  """The tokenizer the workdir's run was trained with: 'bytes', or the path of its copy in the workdir."""
  if old.get('tokenizer', tokenizer_lib.BYTES) == tokenizer_lib.BYTES:
    return tokenizer_lib.BYTES
  copy = paths.as_path(workdir) / TOKENIZER_FILENAME
  if not copy.exists():
    raise FileNotFoundError(f'{copy} does not exist: it is the copy of config.tokenizer={old.tokenizer!r} that the '
                            f'run in {workdir} was trained with; put that model file back there')
  return str(copy)


def _check_tokenizer(old: ConfigDict, new: ConfigDict, workdir: str | epath.Path, advice: str) -> None:
  """Raises WorkdirMismatchError where `new`'s tokenizer is not (by contents) the one the run was trained with."""
  recorded_spec = _recorded_tokenizer(old, workdir)
  before = tokenizer_lib.load(recorded_spec).identity
  now = tokenizer_lib.from_config(new).identity
  if before != now:
    raise WorkdirMismatchError(
        f'{workdir} holds a run trained with the tokenizer {before} ({recorded_spec}), not {now} (config.tokenizer='
        f'{new.get("tokenizer", tokenizer_lib.BYTES)!r}); refusing to use it with this config. {advice}')


def _with_recorded_tokenizer(config: ConfigDict, old: ConfigDict, workdir: str | epath.Path) -> ConfigDict:
  """`config` reading the tokenizer the run was trained with from the workdir (its copy there, if any)."""
  spec = _recorded_tokenizer(old, workdir)
  if config.get('tokenizer', tokenizer_lib.BYTES) == spec:
    return config
  config = ConfigDict(config.to_dict())
  config.tokenizer = spec
  return config


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
