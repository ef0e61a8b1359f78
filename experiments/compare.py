"""Trains (or reads) one run per family on the same data and compares them.

  python -m experiments.compare --workdir=/tmp/seqarch/compare                   # every family, tiny, CPU
  python -m experiments.compare --families=transformer,griffin,yoco --size=150m --workdir=...

On one GPU (an H100 or H200), every family at `small` (20-40M parameters, each within 10% of the
Transformer's; rows of 2048 bytes, batch 32, bf16 compute, the same optimizer settings), trained on the
same number of tokens, with a second seed for two families to show the run-to-run spread:

  python -m experiments.compare --size=small --tokens=50000000 --seeds=transformer:2,griffin:2 \\
      --workdir=/tmp/seqarch/compare_small

(the training split of the default corpus holds about 10M tokens on Python 3.11, so 50M tokens is
about 5 epochs; pick --tokens for the time at hand: every family gets the same.)

For each family config (experiments/configs/<name>.py:<size>) it trains in
<workdir>/<name> (resuming, or reading a finished run; a workdir whose run was
started with another seed, step count, row length, batch or optimizer is
refused), evaluates it (held-out loss and bits/byte, loss by context length in
rows up to 8x the training rows (the config's eval_extrapolation), MQAR and
passkey accuracy; `--eval_batches` caps the batches of each) and measures
decoding (prefill and per-token time, cache bytes) at `--contexts`. It writes
<workdir>/compare.md (the table), compare.json and PNG plots: loss curves, loss
by context length, cache bytes and decode time versus context.

Every run reads the same corpus (the default is the embedded Python standard
library of the running interpreter, one document per source file; the held-out
files are never in the training split, and files with the same bytes are stored
once; rows of 2048 bytes pack the smaller files several to a row) with the
config's seed. `--tokens=N` gives every family N // (batch_size x seq_len) steps, so all
see the same number of training tokens whatever their batch and row length
(`--steps` sets the steps instead; at most one of the two). The optimizer
settings come from the configs (transformer.training_fields: the same for every
family of a size); the table's header states them, and says so if they differ.

`--variants=finch_c2=finch:model.time_mix=finch_c2` adds an ablation: a run named finch_c2 of
finch.py with that field overridden, compared like any config (list it in --families); a hybrid's
pattern may hold commas (`--variants=samba=hybrid:model.layers=rg_lru,local_attention`). Each run's
result is kept in <run>/compare_result.json: a later comparison with the same settings reads it
instead of training and evaluating again, so runs can be added a few at a time. `--contexts=`
(empty) skips the decode measurement.

`--seeds=transformer:2,griffin:2` trains those families again with seeds
config.seed + 1, ... in <workdir>/<name>_seed<seed> (initialisation and data
order change; evaluation uses the first run's seed, so every seed is scored on
the same held-out rows and task examples). The table shows each seed's row and,
for families with several seeds, the spread (max - min) of each metric; decoding
is measured for the first seed only (it does not depend on the weights).
"""
import json
import os
import re
import statistics

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from experiments import compare_plots, configs, flag_parsing
from trainers.experiment import Experiment
from trainers.measurement.decode_speed import benchmark_decode, human_bytes
from trainers.run_config import recorded
from trainers.training.evaluator import evaluate_checkpoint
from trainers.training.train_loop import train

ALL = configs.NAMES
EVAL_TASKS = ('mqar', 'passkey')

_FAMILIES = flags.DEFINE_list('families', ALL, 'Config names under experiments/configs to compare.')
_SIZE = flags.DEFINE_string('size', 'tiny', 'Size variant of every config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the runs, table and plots go.', required=True)
_STEPS = flags.DEFINE_integer('steps', None, 'Training steps per run (default: the config\'s).')
_TOKENS = flags.DEFINE_integer('tokens', None, 'Training tokens per run, the same for every family: each config '
                               'trains N // (batch_size x seq_len) steps. Exclusive with --steps.')
_SEEDS = flags.DEFINE_list('seeds', [], 'family:count,...: runs with seeds config.seed, config.seed + 1, ... of '
                           'those families (the extra ones in <workdir>/<family>_seed<seed>), to show the '
                           'run-to-run spread.')
_EVAL_BATCHES = flags.DEFINE_integer('eval_batches', None, 'Batches of each evaluation (held-out rows, each longer '
                                     "row length, each task and passkey cell); default: the config's eval_batches.")
_CONTEXTS = flags.DEFINE_list('contexts', ['256', '1024', '4096'], 'Decode: context lengths to measure.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'tfds data_dir for every run (default: the configs\').')
_VARIANTS = flags.DEFINE_list('variants', [], 'name=config:field=value[:field=value...],...: a run named `name` of '
                              'experiments/configs/<config>.py with config fields overridden (an ablation), '
                              'listed in --families like a config, e.g. finch_c2=finch:model.time_mix=finch_c2.')
_CACHE_CONTEXTS = [1024, 4096, 8192, 16384, 32768, 65536]


def steps_for_tokens(tokens: int, config) -> int:
  """Steps that train `config` on `tokens` tokens (rounded down to whole steps)."""
  per_step = config.batch_size * config.seq_len
  if tokens // per_step < 1:
    raise ValueError(f'--tokens={tokens} is less than one step of {config.model.name} '
                     f'(batch_size {config.batch_size} x seq_len {config.seq_len} = {per_step} tokens)')
  return tokens // per_step


Variants = dict[str, tuple[str, dict[str, str]]]


def parse_variants(entries: list[str]) -> Variants:
  """['finch_c2=finch:model.time_mix=finch_c2', ...] -> {'finch_c2': ('finch', {'model.time_mix': 'finch_c2'})}.

  An entry that does not start with name=config: continues the one before it, after the comma the flag's list
  split there (a hybrid's pattern: samba=hybrid:model.layers=rg_lru,local_attention:model.dim=256)."""
  joined = []
  for entry in entries:
    if joined and not re.match(r'[^=:]+=[^=:]+:', entry):
      joined[-1] += f',{entry}'
    else:
      joined.append(entry)
  variants = {}
  for entry in joined:
    name, _, spec = entry.partition('=')
    base, *fields = spec.split(':')
    overrides = dict(field.partition('=')[::2] for field in fields)
    if not name or base not in ALL or not overrides or not all(overrides):
      raise ValueError(f'--variants: {entry!r} is not name=config:field=value[:field=value...] with a config '
                       f'of {ALL}, e.g. finch_c2=finch:model.time_mix=finch_c2')
    if name in ALL:
      raise ValueError(f'--variants: {name!r} is already a config name; name the variant otherwise')
    variants[name] = (base, overrides)
  return variants


def _override(config, field: str, text: str) -> None:
  """config.<field> = text, converted to the type of the field's current value."""
  *parents, leaf = field.split('.')
  target = config
  for parent in parents:
    target = target[parent]
  if leaf not in target:
    raise ValueError(f'--variants: config.{field} does not exist')
  old = target[leaf]
  target[leaf] = text.lower() in ('1', 'true') if isinstance(old, bool) else type(old)(text)


def family_config(name: str, size: str, steps: int | None, data_dir: str = '', *, tokens: int | None = None,
                  seed_offset: int = 0, eval_batches: int | None = None, variants: Variants | None = None):
  if steps and tokens:
    raise ValueError('--steps and --tokens both set: give one (steps per run, or tokens per run)')
  base, overrides = (variants or {}).get(name, (name, {}))
  config = configs.get(base, size)
  for field, text in overrides.items():
    _override(config, field, text)
  if data_dir:
    config.dataset.data_dir = data_dir
  if tokens:
    steps = steps_for_tokens(tokens, config)
  if steps:
    config.total_steps = steps
    config.eval_every = steps
  if eval_batches:
    config.eval_batches = eval_batches
  config.eval_tasks = EVAL_TASKS
  config.seed += seed_offset
  return config


def parse_seeds(entries: list[str], families: list[str]) -> dict[str, int]:
  """['transformer:2', ...] -> {'transformer': 2, ...}: how many seeds each named family runs."""
  counts = {}
  for entry in entries:
    name, _, count = entry.partition(':')
    if not count.isdigit() or int(count) < 1:
      raise ValueError(f'--seeds: {entry!r} is not family:count (count >= 1), e.g. transformer:2')
    if name not in families:
      raise ValueError(f'--seeds: {name!r} is not one of --families {families}')
    counts[name] = int(count)
  return counts


def passkey_summary(scores) -> dict:
  """evaluator.task_scores' passkey entry ({'length<L>_depth<d>': accuracy} or a 'skipped' message) ->
  mean accuracy and the mean per row length."""
  if not isinstance(scores, dict) or not scores:
    return dict(mean=None, by_length={}, note=scores)
  by_length: dict[int, list[float]] = {}
  for key, accuracy in scores.items():
    by_length.setdefault(int(key.split('_')[0].removeprefix('length')), []).append(accuracy)
  return dict(mean=statistics.mean(scores.values()),
              by_length={length: statistics.mean(v) for length, v in sorted(by_length.items())})


def run_name(name: str, config, seed_offset: int) -> str:
  """The run's folder under the workdir: the family's name, `<name>_seed<seed>` for its extra seeds."""
  return f'{name}_seed{config.seed}' if seed_offset else name


def check_recorded_run(config, run_dir: str) -> None:
  """Refuses a workdir whose run was started with other training settings than this comparison's (its
  results would be reported under the wrong tokens, seed or optimizer); the same settings resume or read it."""
  old = recorded(run_dir)
  if old is None:
    return
  for field in ('seed', 'total_steps', 'seq_len', 'batch_size', 'optimizer'):
    was, now = old.get(field), config[field]
    was, now = (v.to_dict() if hasattr(v, 'to_dict') else v for v in (was, now))
    if was != now:
      raise ValueError(f'{run_dir} holds a run started with {field}={was}, this comparison trains with {now}: '
                       'use another --workdir, or remove that run')


RESULT_FILE = 'compare_result.json'


def run_family(name: str, size: str, steps: int | None, workdir: str, contexts: list[int],
               data_dir: str = '', *, tokens: int | None = None, seed_offset: int = 0,
               eval_batches: int | None = None, variants: Variants | None = None) -> dict:
  """Trains (or resumes) and evaluates one run; its result is kept in <run>/compare_result.json, which a
  later comparison with the same settings reads instead of evaluating again."""
  config = family_config(name, size, steps, data_dir, tokens=tokens, seed_offset=seed_offset,
                         eval_batches=eval_batches, variants=variants)
  run = run_name(name, config, seed_offset)
  run_dir = os.path.join(workdir, run)
  check_recorded_run(config, run_dir)
  settings = dict(config=config.to_json_best_effort(sort_keys=True), contexts=contexts)
  kept = _kept_result(run_dir, settings)
  if kept:
    logging.info('%s: read the finished result %s', run, os.path.join(run_dir, RESULT_FILE))
    return kept
  train(config, run_dir)
  eval_config = family_config(name, size, steps, data_dir, tokens=tokens,  # the first seed's task examples
                              eval_batches=eval_batches, variants=variants)
  evaluation = evaluate_checkpoint(eval_config, run_dir, num_batches=config.eval_batches)
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  exp = Experiment.build(config)
  model = exp.abstract_model
  longest = max(evaluation['extrapolation'].values(), key=lambda e: e['seq_len'], default=evaluation)
  decode = benchmark_decode(config, contexts, [1], 8, repeats=1)['results'] if contexts and not seed_offset else None
  result = dict(
      name=name, run=run, seed=config.seed, params=sum(x.size for x in jax.tree.leaves(exp.abstract_state.params)),
      seq_len=config.seq_len, batch_size=config.batch_size, total_steps=config.total_steps,
      train_tokens=config.total_steps * config.batch_size * config.seq_len, optimizer=config.optimizer.to_dict(),
      streaming=bool(config.streaming.enabled), dataset=evaluation['dataset'],
      loss=evaluation['loss'], bits_per_byte=evaluation['bits_per_byte'],
      longest_context=dict(seq_len=longest['seq_len'], loss_by_position=longest['loss_by_position']),
      mqar_accuracy=evaluation['tasks'].get('mqar'),
      passkey=passkey_summary(evaluation['tasks'].get('passkey')),
      cache_bytes={c: model.cache_bytes(1, c, jnp.bfloat16) for c in _CACHE_CONTEXTS},
      tokens_per_s=statistics.median([r['tokens_per_s'] for r in records if r.get('tokens_per_s')] or [0.0]),
      curve=[(r['step'], r['loss']) for r in records if 'loss' in r],
      decode=decode, base=(variants or {}).get(name, (name, {}))[0], overrides=(variants or {}).get(name, (name, {}))[1])
  with open(os.path.join(run_dir, RESULT_FILE), 'w') as f:
    json.dump(dict(settings=settings, result=result), f)
  return result


def _kept_result(run_dir: str, settings: dict) -> dict | None:
  """The result an earlier comparison stored for this run with the same settings, else None."""
  try:
    with open(os.path.join(run_dir, RESULT_FILE)) as f:
      kept = json.load(f)
  except (OSError, ValueError):
    return None
  if kept.get('settings') != json.loads(json.dumps(settings)):
    return None
  result = kept['result']  # JSON made the context keys strings
  result['cache_bytes'] = {int(k): v for k, v in result['cache_bytes'].items()}
  result['passkey']['by_length'] = {int(k): v for k, v in result['passkey']['by_length'].items()}
  return result


def _optimizer_text(opt: dict) -> str:
  return (f"AdamW, peak lr {opt['learning_rate']:g}, {opt['warmup_steps']} warmup steps, cosine decay to "
          f"{opt['end_lr_fraction']:g} x peak, b1 {opt['b1']:g}, b2 {opt['b2']:g}, eps {opt['eps']:g}, "
          f"weight decay {opt['weight_decay']:g}, clip norm {opt['clip_norm']:g}")


def header(results: list[dict], size: str, steps: int | None, tokens: int | None) -> list[str]:
  """What every run shares (or, where they differ, each family's value): size, tokens, rows, optimizer."""
  firsts = [r for r in results if r['run'] == r['name']] or results
  if tokens:
    how = f'`--tokens={tokens}`: total_steps = {tokens} // (batch x seq_len)'
  elif steps:
    how = f'`--steps={steps}`'
  else:
    how = "each config's total_steps"
  shapes = {(r['seq_len'], r['batch_size'], r['total_steps']) for r in firsts}
  if len(shapes) == 1:
    seq_len, batch, total = shapes.pop()
    run_text = (f"{firsts[0]['train_tokens']:,} training tokens per run: {total} steps of batch {batch} x "
                f'seq_len {seq_len} for every family ({how})')
  else:
    run_text = (f'training per family ({how}): ' + '; '.join(
        f"{r['name']} {r['train_tokens']:,} tokens = {r['total_steps']} steps x batch {r['batch_size']} x "
        f"seq_len {r['seq_len']}" for r in firsts))
  optimizers = {json.dumps(r['optimizer'], sort_keys=True) for r in results}
  if len(optimizers) == 1:
    opt_text = f"Optimizer settings the same for every family: {_optimizer_text(results[0]['optimizer'])}."
  else:
    opt_text = 'Optimizer settings DIFFER between families: ' + '; '.join(
        f"{r['run']}: {_optimizer_text(r['optimizer'])}" for r in results) + '.'
  streaming = [r['name'] for r in firsts if r['streaming']]
  seeds = sorted({r['seed'] for r in firsts})
  data_text = ('Same training split for every family' +
               (f" ({', '.join(streaming)} read it as long-document streams, one per batch row)" if streaming else '') +
               f"; seed {', '.join(map(str, seeds))} for every family's first run; evaluation on held-out files.")
  variants = [f"`{r['name']}` is `{r['base']}` with " + ', '.join(f'config.{k}={v}' for k, v in r['overrides'].items())
              for r in firsts if r.get('overrides')]
  variant_text = ['Ablations: ' + '; '.join(variants) + '.', ''] if variants else []
  return [f'Size `{size}`, {run_text}.', '', opt_text, '', data_text + _corpus_text(firsts[0].get('dataset')), '',
          *variant_text]


def _corpus_text(dataset: dict | None) -> str:
  """The corpus as the runs read it (data.describe), in a sentence."""
  if not dataset or dataset.get('generated'):
    return ''
  train, held_out = dataset['train'], dataset['validation']
  same = dataset.get('overlap', {}).get('identical_to_train')
  return (f" Corpus `{dataset['name']}` ({dataset['build']}): {train['documents']} training documents "
          f"({train['tokens']:,} tokens), {held_out['documents']} held-out ({held_out['tokens']:,} tokens)"
          + (f', {same} of them identical to a training document' if same is not None else '') +
          '; rows pack whole documents, positions restarting at each (every mixer resets there).')


def _passkey_cell(passkey: dict) -> str:
  if passkey.get('mean') is None:
    return 'n/a'
  return f"{passkey['mean']:.3f} ({' / '.join(f'{v:.2f}' for v in passkey['by_length'].values())})"


def spread_table(results: list[dict]) -> list[str]:
  """Max - min over the seeds of each family run with several."""
  by_family: dict[str, list[dict]] = {}
  for r in results:
    by_family.setdefault(r['name'], []).append(r)
  several = {name: runs for name, runs in by_family.items() if len(runs) > 1}
  if not several:
    return []
  spread = lambda values: f'{max(values) - min(values):.3f}' if None not in values else 'n/a'
  lines = ['', 'Run-to-run spread (max - min over seeds):', '',
           '| family | seeds | loss | bits/byte | MQAR accuracy | passkey accuracy |',
           '| --- | --- | ---: | ---: | ---: | ---: |']
  for name, runs in several.items():
    lines.append(f"| {name} | {', '.join(str(r['seed']) for r in runs)} | {spread([r['loss'] for r in runs])} | "
                 f"{spread([r['bits_per_byte'] for r in runs])} | {spread([r['mqar_accuracy'] for r in runs])} | "
                 f"{spread([r['passkey']['mean'] for r in runs])} |")
  return lines


def markdown_table(results: list[dict], size: str, steps: int | None, tokens: int | None = None) -> str:
  lines = header(results, size, steps, tokens) + [
      '| family | seed | params | loss (nats/token) | bits/byte | loss at the longest context | MQAR accuracy '
      '| passkey accuracy (rows 1x / 2x / 4x) | cache at 8K (bf16, batch 1) | train tokens/s |',
      '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
  for r in results:
    deep = compare_plots.buckets_inside_rows(r['longest_context'])[-1]  # the past-the-end bucket: 1 target a row
    mqar = f"{r['mqar_accuracy']:.3f}" if r['mqar_accuracy'] is not None else 'n/a'
    lines.append(f"| {r['name']} | {r['seed']} | {r['params'] / 1e6:.2f}M | {r['loss']:.3f} | "
                 f"{r['bits_per_byte']:.3f} | {deep['loss']:.3f} (ctx {deep['first']}-{deep['last']} in rows of "
                 f"{r['longest_context']['seq_len']}) | {mqar} | {_passkey_cell(r['passkey'])} | "
                 f"{human_bytes(r['cache_bytes'][8192])} | {r['tokens_per_s']:.0f} |")
  return '\n'.join(lines + spread_table(results)) + '\n'


def main():
  try:
    variants = parse_variants(_VARIANTS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  unknown = sorted(set(_FAMILIES.value) - set(ALL) - set(variants))
  if unknown:
    raise app.UsageError(f'--families: unknown configs {unknown}; known: {ALL} and --variants {sorted(variants)}')
  if _STEPS.value and _TOKENS.value:
    raise app.UsageError('--steps and --tokens are exclusive: give the steps per run or the tokens per run')
  if _TOKENS.value is not None and _TOKENS.value < 1:
    raise app.UsageError(f'--tokens={_TOKENS.value}: must be positive')
  workdir = _WORKDIR.value
  try:
    seeds = parse_seeds(_SEEDS.value, _FAMILIES.value)
    runs = [(name, 0) for name in _FAMILIES.value]  # every family's first run, then the extra seeds
    runs += [(name, k) for name in _FAMILIES.value for k in range(1, seeds.get(name, 1))]
    for name, k in runs:  # fail before the first run trains, not after it
      config = family_config(name, _SIZE.value, _STEPS.value, tokens=_TOKENS.value, seed_offset=k,
                             eval_batches=_EVAL_BATCHES.value, variants=variants)
      check_recorded_run(config, os.path.join(workdir, run_name(name, config, k)))
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  os.makedirs(workdir, exist_ok=True)
  contexts = [int(c) for c in _CONTEXTS.value]  # none: decoding is not measured
  results = {}
  for name, k in runs:
    logging.info('=== %s%s', name, f' (seed offset {k})' if k else '')
    results[name, k] = run_family(name, _SIZE.value, _STEPS.value, workdir, contexts, _DATA_DIR.value,
                                  tokens=_TOKENS.value, seed_offset=k, eval_batches=_EVAL_BATCHES.value,
                                  variants=variants)
  results = [results[key] for key in sorted(results, key=lambda key: (_FAMILIES.value.index(key[0]), key[1]))]
  with open(os.path.join(workdir, 'compare.json'), 'w') as f:
    json.dump(results, f, indent=2)
  table = markdown_table(results, _SIZE.value, _STEPS.value, _TOKENS.value)
  with open(os.path.join(workdir, 'compare.md'), 'w') as f:
    f.write(table)
  compare_plots.write_all(results, workdir)
  print(table)


if __name__ == '__main__':
  flag_parsing.run(main)
