"""Measures training and decoding speed and memory on synthetic data.

  python -m experiments.benchmark --config=experiments/configs/transformer.py:150m --output=bench.json
  python -m experiments.benchmark --mode=decode --config=experiments/configs/griffin.py:150m \
      --contexts=4096,32768,131072 --decode_batch=1,16 --max_batch --peer --output=decode.json
  python -m experiments.benchmark --config=experiments/configs/griffin.py:bench \
      --peer --docs_per_row=1                                                         # + recurrentgemma
  python -m experiments.benchmark --config=experiments/configs/transformer.py:1b --num_devices=2 \
      --config.mesh.fsdp=2 --config.batch_size=16                                     # FSDP over 2 GPUs
  python -m experiments.benchmark --mode=op --op=wkv --op_shape=8,2048,16,64 --peer  # + fla chunk_rwkv6
  python -m experiments.benchmark --mode=op --op=attention --op_shape=8,4096,16,64   # cuDNN over documents
  python -m experiments.benchmark --mode=op --op=rg_lru --op_shape=8,2048,8,128     # fused RG-LRU, W = 1024

Each mode reads its own flags (MODE_FLAGS below); a flag of another mode is refused in one line.
`--mode=train`: compile time, the median step time of `--timed_steps` timed steps
(after `--warmup` untimed ones), tokens/s, MFU against the chip's peak bf16
rate and the device's peak memory, on rows of `--docs_per_row` documents
(default 4; 1: one document a row). `mfu` counts the work done (each query's
keys within its own document: cuDNN skips other documents' key blocks),
`mfu_maxtext` MaxText's formula (full causal attention over each row), with
their `train_flops_per_token` and `train_flops_per_token_maxtext`.
`--mode=decode`: what users run, the sampler's one jitted generation call
(prefill + `--new_tokens` tokens; trainers/measurement/decode_speed.py), at each context
(prompt + new tokens) and batch size: prefill time, decode tokens/s and ms per
token, the program's memory and the cache's bytes; `--max_batch` adds the
largest batch that fits at each context (the Griffin paper's throughput curve:
experiments/plot_decode.py draws it from several outputs). The prompt is
prefilled `config.prefill_chunk` tokens per call (0: at once).
`--mode=op`: forward + backward time of one operator (trainers/measurement/op_speed.py)
at `--op_shape` = B,T,H,D (the RG-LRU's width is H x D); no config needed.
`--peer`: also times the family's peer (experiments/peers) at the same shape
in the same run, and reports our tokens/s over the peer's (decode: its own
sampler or `generate`, same contexts and batches). In train mode the peer must
do the same work: a peer that attends across documents (the Transformer's) is
timed at one document a row, so `--peer` needs `--docs_per_row=1` there
(refused otherwise); the JSON's `peer.docs_per_row` says what the peer ran at.
`--num_devices`: use the first N devices (default all); the config's mesh must
cover them. `tokens_per_s_per_device` is what scaling efficiency compares.
Needs no dataset: rows are random bytes packed as documents of random length.
"""
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

import jax

from experiments import flag_parsing
from experiments.peers import (PEER_MODULES, benchmark_decode_peer, benchmark_operator_peer, benchmark_peer,
                               peer_docs_per_row, with_peer_ratios)
from trainers.measurement.decode_speed import benchmark_decode
from trainers.measurement.op_speed import OPERATORS, benchmark_operator
from trainers.measurement.train_speed import benchmark_train_step

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:size].', lock_config=True)
_TIMED_STEPS = flags.DEFINE_integer('timed_steps', 10, 'Train and op modes: timed steps (median).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Train mode: untimed steps after the compile.')
_OUTPUT = flags.DEFINE_string('output', None, 'Where to write the JSON results.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'decode', 'op'], 'What to measure.')
_PEER = flags.DEFINE_bool('peer', False, 'Also time the peer (experiments/peers) in the same run.')
_NUM_DEVICES = flags.DEFINE_integer('num_devices', None, 'Train mode: use the first N devices (default: all).')
_DOCS_PER_ROW = flags.DEFINE_integer('docs_per_row', 4, 'Train mode: documents in each synthetic row (1: one a '
                                     'row, the work of a peer that attends across documents).', lower_bound=1)
_CONTEXTS = flags.DEFINE_list('contexts', ['4096', '32768', '131072'], 'Decode: context lengths (prompt + new tokens).')
_DECODE_BATCH = flags.DEFINE_list('decode_batch', ['1'], 'Decode: batch sizes (sequences decoded together).')
_MAX_BATCH = flags.DEFINE_bool('max_batch', False, 'Decode: also the largest batch that fits at each context.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 128, 'Decode: tokens generated after the prompt (0: prefill only).')
_COMPILE_ONLY = flags.DEFINE_bool('compile_only', False, 'Decode: compile and report memory and fit, run nothing.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Decode: timed calls per measurement (median).')
_OP = flags.DEFINE_enum('op', 'wkv', sorted(OPERATORS), 'Op mode: the operator.')
_OP_SHAPE = flags.DEFINE_list('op_shape', ['8', '2048', '16', '64'], 'Op mode: batch, length, heads, head dim.')

# The flags each mode reads; one given on the command line that its mode does not read is refused.
MODE_FLAGS = {
    'train': {'config', 'timed_steps', 'warmup', 'num_devices', 'docs_per_row'},
    'decode': {'config', 'contexts', 'decode_batch', 'max_batch', 'new_tokens', 'compile_only', 'repeats'},
    'op': {'op', 'op_shape', 'timed_steps'},
}
COMMON_FLAGS = {'mode', 'output', 'peer'}


def check_mode_flags(values: dict) -> bool:
  """Validator: every benchmark flag given on the command line is one its --mode reads (one line otherwise)."""
  mode = values['mode']
  for name in sorted(set().union(*MODE_FLAGS.values()) - MODE_FLAGS[mode] - COMMON_FLAGS):
    if flags.FLAGS[name].present:
      used_by = ' and '.join(f'--mode={m}' for m, names in MODE_FLAGS.items() if name in names)
      raise flags.ValidationError(f'--{name} is a {used_by} flag; --mode={mode} does not read it')
  return True


def _operator_results() -> dict:
  if len(_OP_SHAPE.value) != 4:
    raise app.UsageError(f'--op_shape={",".join(_OP_SHAPE.value)} must be 4 integers: B,T,H,D')
  shape = [int(n) for n in _OP_SHAPE.value]
  results = benchmark_operator(_OP.value, *shape, _TIMED_STEPS.value)
  if _PEER.value:
    results['peer'] = benchmark_operator_peer(_OP.value, *shape, _TIMED_STEPS.value)
    results['ratio_to_peer'] = results['fwd_bwd_s'] / results['peer']['fwd_bwd_s']
  logging.info('%s', json.dumps(results))
  return results


def _decode_results() -> dict:
  config = _CONFIG.value
  contexts, batches = [int(c) for c in _CONTEXTS.value], [int(b) for b in _DECODE_BATCH.value]
  peer = None
  if _PEER.value:  # first: a PyTorch peer gives its memory back when done, JAX's pool keeps what it took
    peer = benchmark_decode_peer(config, contexts, batches, _NEW_TOKENS.value, _REPEATS.value, _MAX_BATCH.value)
  results = benchmark_decode(config, contexts, batches, _NEW_TOKENS.value, max_batch=_MAX_BATCH.value,
                             prefill_chunk=config.get('prefill_chunk', 0), repeats=_REPEATS.value,
                             compile_only=_COMPILE_ONLY.value)
  if peer is not None:
    with_peer_ratios(results['results'], peer)
    results['peer'] = peer
  return results


def main():
  if _PEER.value:  # a PyTorch peer shares the GPU with this process: JAX must not take 75% of it up front
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  if _MODE.value == 'op':
    results = _operator_results()
  elif _MODE.value == 'train':
    devices = jax.devices()[:_NUM_DEVICES.value] if _NUM_DEVICES.value else None
    results = benchmark_train_step(_CONFIG.value, _TIMED_STEPS.value, _WARMUP.value, devices, _DOCS_PER_ROW.value)
    logging.info('%s', json.dumps({k: v for k, v in results.items() if k not in ('step_s_all', 'model')}))
    if _PEER.value:
      results['peer'] = benchmark_peer(_CONFIG.value, _TIMED_STEPS.value, _WARMUP.value, _DOCS_PER_ROW.value)
      results['ratio_to_peer'] = results['tokens_per_s'] / results['peer']['tokens_per_s']
      logging.info('peer: %s; ours / peer = %.2fx', json.dumps(results['peer']), results['ratio_to_peer'])
  else:
    results = _decode_results()
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      json.dump(results, f, indent=2)


def check_peer_work(values: dict) -> bool:
  """Validator of --mode, --peer and --docs_per_row (and the parsed --config): in train mode, `--peer`
  only where the peer does our work at `--docs_per_row` (experiments.peers.peer_docs_per_row); one line
  naming both flags otherwise. (Not a validator of --config itself: absl would print the whole config.)"""
  config = _CONFIG.value
  if values['mode'] != 'train' or not values['peer'] or config is None or config.model.name not in PEER_MODULES:
    return True  # a family without a peer is refused by benchmark_peer, naming the families that have one
  try:
    peer_docs_per_row(config.model.name, values['docs_per_row'])
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None
  return True


if __name__ == '__main__':
  flags.register_validator('config', lambda c: c is not None or _MODE.value == 'op',
                           '--config is required except with --mode=op')
  flags.register_multi_flags_validator(['mode', 'peer', 'docs_per_row'], check_peer_work)
  flags.register_multi_flags_validator(['mode'], check_mode_flags)
  flag_parsing.run(main)
