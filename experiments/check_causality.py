"""Checks causality and document isolation of every config on this machine's kernels.

  python -m experiments.check_causality --size=small --output=causality.json      # on a GPU: cuDNN, Pallas

For each config (experiments/configs/<name>.py:<size>, its dtype and `attention_impl`, so `auto`
takes cuDNN attention and the fused recurrence kernels on a GPU) with random weights, two rows of
seq_len tokens: replacing the tokens from ~53% of the row on must move no earlier logit, and
replacing the first document of a packed row must move no logit of the second
(trainers/measurement/causality.py). Streaming configs are probed through a carried cache too. A probe holds
when its leak is at most `--tolerance` x its effect (bf16: the summation order of a kernel may
differ between the two passes); tests/test_causality.py runs the same probes on CPU in float32.
"""
import json

import jax
from absl import flags
from flax import nnx

from experiments import configs, flag_parsing
from trainers.experiment import Experiment
from trainers.measurement import causality

_CONFIGS = flags.DEFINE_list('configs', configs.NAMES, 'Config names under experiments/configs.')
_SIZE = flags.DEFINE_string('size', 'small', 'Size variant of every config.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 0, "Row length (0: each config's seq_len).")
_TOLERANCE = flags.DEFINE_float('tolerance', 1e-3, 'A probe holds when leak <= tolerance x effect.')
_OUTPUT = flags.DEFINE_string('output', '', 'JSON file for the results.')


def check_config(name: str, size: str, seq_len: int, tolerance: float) -> dict:
  config = configs.get(name, size)
  exp = Experiment.build(config, jax.devices()[:1])
  with exp.activate():
    model = causality.with_random_weights(nnx.merge(exp.graphdef, exp.new_state().params))
    seq_len = seq_len or config.seq_len
    result = dict(config=name, size=size, seq_len=seq_len, dtype=config.model.dtype,
                  attention_impl=config.model.get('attention_impl'), platform=jax.devices()[0].device_kind)
    for with_cache in ([False, True] if config.streaming.enabled else [False]):
      for probe, numbers in causality.check(model, seq_len, with_cache=with_cache).items():
        numbers['held'] = numbers['leak'] <= tolerance * numbers['effect']
        result[f'{probe}{"_cached" if with_cache else ""}'] = numbers
  return result


def main():
  results = []
  for name in _CONFIGS.value:
    results.append(check_config(name, _SIZE.value, _SEQ_LEN.value, _TOLERANCE.value))
    print(json.dumps(results[-1]), flush=True)
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      json.dump(results, f, indent=2)
  failed = [r['config'] for r in results for k, v in r.items() if isinstance(v, dict) and not v['held']]
  if failed:
    raise SystemExit(f'causality leak in {sorted(set(failed))}')


if __name__ == '__main__':
  flag_parsing.run(main)
