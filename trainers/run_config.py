"""The config a workdir was started with, so a resume cannot silently mix models.

The first start writes `<workdir>/config.json`. A later start compares
`config.model`: fields that change the parameters must match (fields a family
lists in `runtime_fields`, such as the compute dtype or the attention kernel,
may differ), else it refuses to resume and names each difference.
"""
import json
import os

import jax
from ml_collections import ConfigDict

import architectures

FILENAME = 'config.json'


class WorkdirMismatchError(ValueError):
  """The workdir holds a run of a different model."""


def record_or_check(config: ConfigDict, workdir: str) -> None:
  path = os.path.join(workdir, FILENAME)
  if not os.path.exists(path):
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      with open(path, 'w') as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    return
  with open(path) as f:
    recorded = json.load(f).get('model', {})
  current = config.model.to_dict()
  runtime = set(architectures.get_family(current['name']).Config.runtime_fields)
  differences = [f'config.model.{key}: {recorded.get(key, "<unset>")!r} in the workdir, {current.get(key, "<unset>")!r} now'
                 for key in sorted(set(recorded) | set(current))
                 if key not in runtime and _normalise(recorded.get(key)) != _normalise(current.get(key))]
  if differences:
    raise WorkdirMismatchError(f'{workdir} holds a run of a different model; refusing to resume. '
                               + '; '.join(differences) + '. Use a new --workdir, or the recorded config.')


def _normalise(value):
  return list(value) if isinstance(value, tuple) else value
