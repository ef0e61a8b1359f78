"""Trains (or reads) one run per family on the same data and compares them.

  python -m experiments.compare --workdir=/tmp/seqarch/compare                   # every family, tiny, CPU
  python -m experiments.compare --families=transformer,griffin,yoco --size=150m --workdir=...

For each family config (experiments/configs/<name>.py:<size>) it trains in
<workdir>/<name> (resuming, or reading a finished run), evaluates it (held-out
loss and bits/byte, loss by context length at the longest extrapolation, MQAR
accuracy) and measures decoding (prefill and per-token time, cache bytes) at
`--contexts`. It writes <workdir>/compare.md (the table), compare.json and PNG
plots: loss curves, loss by context length, cache bytes and decode time versus
context. Every run uses the same data, steps, batch and sequence length.
"""
import glob
import importlib
import json
import os
import statistics

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from experiments import compare_plots, flag_parsing
from trainers.evaluator import evaluate_checkpoint
from trainers.experiment import Experiment
from trainers.logs import quiet_library_logs
from trainers.measure_decode import benchmark_decode, human_bytes
from trainers.train_loop import train

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')
ALL = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(_CONFIG_DIR, '*.py'))
             if not os.path.basename(p).startswith(('_', 'common')))

_FAMILIES = flags.DEFINE_list('families', ALL, 'Config names under experiments/configs to compare.')
_SIZE = flags.DEFINE_string('size', 'tiny', 'Size variant of every config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the runs, table and plots go.', required=True)
_STEPS = flags.DEFINE_integer('steps', None, 'Training steps per run (default: the config\'s).')
_CONTEXTS = flags.DEFINE_list('contexts', ['256', '1024', '4096'], 'Decode: context lengths to measure.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'tfds data_dir for every run (default: the configs\').')
_CACHE_CONTEXTS = [1024, 4096, 8192, 16384, 32768, 65536]


def family_config(name: str, size: str, steps: int | None, data_dir: str = ''):
  config = importlib.import_module(f'experiments.configs.{name}').get_config(size)
  if data_dir:
    config.dataset.data_dir = data_dir
  if steps:
    config.total_steps = steps
    config.eval_every = steps
  config.eval_tasks = ('mqar',)
  return config


def run_family(name: str, size: str, steps: int | None, workdir: str, contexts: list[int],
               data_dir: str = '') -> dict:
  config = family_config(name, size, steps, data_dir)
  run_dir = os.path.join(workdir, name)
  train(config, run_dir)
  evaluation = evaluate_checkpoint(config, run_dir, num_batches=config.eval_batches)
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  exp = Experiment.build(config)
  model = exp.abstract_model
  longest = max(evaluation['extrapolation'].values(), key=lambda e: e['seq_len'], default=evaluation)
  decode = benchmark_decode(config, contexts, [1], 8, repeats=1)
  return dict(
      name=name, params=sum(x.size for x in jax.tree.leaves(exp.abstract_state.params)),
      loss=evaluation['loss'], bits_per_byte=evaluation['bits_per_byte'],
      longest_context=dict(seq_len=longest['seq_len'], loss_by_position=longest['loss_by_position']),
      mqar_accuracy=evaluation['tasks'].get('mqar'),
      cache_bytes={c: model.cache_bytes(1, c, jnp.bfloat16) for c in _CACHE_CONTEXTS},
      tokens_per_s=statistics.median([r['tokens_per_s'] for r in records if r.get('tokens_per_s')] or [0.0]),
      curve=[(r['step'], r['loss']) for r in records if 'loss' in r],
      decode=decode['results'])


def markdown_table(results: list[dict], size: str, steps: int | None) -> str:
  steps_text = steps or "each config's"
  lines = [f'Size `{size}`, {steps_text} training steps, same data and batches for every family.', '',
           '| family | params | loss (nats/token) | bits/byte | loss at the longest context | MQAR accuracy '
           '| cache at 8K (bf16, batch 1) | train tokens/s |',
           '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
  for r in results:
    last = r['longest_context']['loss_by_position'][-1]
    lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['loss']:.3f} | {r['bits_per_byte']:.3f} | "
                 f"{last['loss']:.3f} (ctx {last['first']}-{last['last']} of {r['longest_context']['seq_len']}) | "
                 f"{r['mqar_accuracy']:.3f} | {human_bytes(r['cache_bytes'][8192])} | {r['tokens_per_s']:.0f} |")
  return '\n'.join(lines) + '\n'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  unknown = sorted(set(_FAMILIES.value) - set(ALL))
  if unknown:
    raise app.UsageError(f'--families: unknown configs {unknown}; known: {ALL}')
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  results = []
  for name in _FAMILIES.value:
    logging.info('=== %s', name)
    results.append(run_family(name, _SIZE.value, _STEPS.value, workdir, [int(c) for c in _CONTEXTS.value],
                              _DATA_DIR.value))
  with open(os.path.join(workdir, 'compare.json'), 'w') as f:
    json.dump(results, f, indent=2)
  table = markdown_table(results, _SIZE.value, _STEPS.value)
  with open(os.path.join(workdir, 'compare.md'), 'w') as f:
    f.write(table)
  compare_plots.write_all(results, workdir)
  print(table)


if __name__ == '__main__':
  flag_parsing.run(main)
