"""Held-out evaluation: loss (nats/token), perplexity, bits per byte, loss by
position in the document, length extrapolation, and task accuracy; for a time
series, MSE and MAE of the next-step predictions.

bits/byte = (summed nats over all counted targets) / ln 2 / (the bytes those
targets stand for: each token's `token_bytes`, 1 for a byte token, the bytes
of its piece of the document for a SentencePiece token, 0 for an end of
document, which counts in the loss but is no byte), so byte and subword runs
compare.
Loss by position groups targets by how many tokens of their document precede
them in the row (the context the model sees) into buckets [1], [2, 4), [4, 8),
...; the long-context benefit of recurrent models shows in the late buckets.
Extrapolation evaluates rows k times longer than the training rows. On a
synthetic task split, accuracy is the fraction of answer tokens the model's
argmax predicts exactly.

`evaluate_checkpoint` logs each part as it starts and its batches every
PROGRESS_SECONDS (and, in training too, each compile of the eval step with its
time); `write_results` keeps one file per checkpoint step and points eval.json
at the newest step only.
"""
import json
import math
import time

import jax
from absl import logging
from etils import epath
from flax import nnx
from ml_collections import ConfigDict

from trainers import data, paths
from trainers.checkpoints import read_checkpoint
from trainers.experiment import Experiment
from trainers.logs import compiling
from trainers.tokenizer import BYTES
from trainers.training import steps

PROGRESS_SECONDS = 10.0


class EvalStep:
  """The jitted eval step of a model graph; each batch shape's first call (its compile) is logged and timed."""

  def __init__(self, graphdef: nnx.GraphDef):
    self.jitted = jax.jit(steps.make_eval_step(graphdef))
    self.compiled: set[tuple[int, ...]] = set()

  def __call__(self, params: nnx.State, batch: steps.Batch) -> dict:
    shape = batch['positions'].shape
    if shape in self.compiled:
      return self.jitted(params, batch)
    with compiling(f'the evaluation step for batches of {shape[0]} rows of {shape[1] - 1} tokens'):
      sums = jax.block_until_ready(self.jitted(params, batch))
    self.compiled.add(shape)
    return sums


class Evaluator:
  """Jits the eval step once (or shares `eval_step`, the EvalStep of another Evaluator of the same experiment:
  shapes seen before then do not compile again); call it with the params to evaluate. With `progress` (a label)
  it logs the batches done every PROGRESS_SECONDS and the time taken."""

  def __init__(self, config: ConfigDict, graphdef: nnx.GraphDef, batch_sharding: jax.sharding.NamedSharding,
               *, split: str = 'validation', num_batches: int | None = None, seq_len: int | None = None,
               progress: str = '', eval_step: EvalStep | None = None):
    self.config = config
    self.split = split
    self.num_batches = num_batches
    self.seq_len = seq_len or config.seq_len
    self.batch_sharding = batch_sharding
    self.progress = progress
    self.eval_step = eval_step or EvalStep(graphdef)

  def __call__(self, params: nnx.State) -> dict:
    totals = None
    batches = data.make_eval_batches(self.config, split=self.split, num_batches=self.num_batches,
                                     seq_len=self.seq_len, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    start = last_log = time.perf_counter()
    for done, batch in enumerate(batches, 1):
      device_batch = {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}
      sums = self.eval_step(params, device_batch)  # summed on device: one host transfer at the end
      totals = sums if totals is None else jax.tree.map(jax.numpy.add, totals, sums)
      if self.progress and time.perf_counter() - last_log > PROGRESS_SECONDS:
        jax.block_until_ready(totals)
        last_log = time.perf_counter()
        logging.info('%s: batch %d of %d (%.0f s)', self.progress, done, len(batches), last_log - start)
    if totals is None:
      raise ValueError(f'the {self.split!r} split yielded no evaluation batches')
    totals = jax.device_get(totals)
    count = max(float(totals['target_count']), 1.0)
    loss = float(totals['loss_sum']) / count
    if 'abs_error_sum' in totals:  # forecasting: the loss is the MSE
      results = dict(loss=loss, mse=loss, mae=float(totals['abs_error_sum']) / count)
    else:
      results = dict(loss=loss, perplexity=math.exp(min(loss, 50.0)),
                     bits_per_byte=float(totals['loss_sum']) / math.log(2) / max(float(totals['byte_count']), 1.0))
    results.update(target_tokens=float(totals['target_count']),
                   loss_by_position=[dict(first=2 ** b, last=2 ** (b + 1) - 1, loss=float(l / c), count=float(c))
                                     for b, (l, c) in enumerate(zip(totals['bucket_loss'], totals['bucket_count']))
                                     if c > 0])
    if 'answer_count' in totals:
      results['accuracy'] = float(totals['answer_correct']) / max(float(totals['answer_count']), 1.0)
    if self.progress:
      logging.info('%s: %d batches in %.0f s', self.progress, len(batches), time.perf_counter() - start)
    return results

  def scalars(self, params: nnx.State) -> dict:
    """The scalar results only (for the metrics log during training)."""
    return {k: v for k, v in self(params).items() if not isinstance(v, list)}


PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PASSKEY_MIN_LENGTH = 128  # the needle and the question take ~100 bytes


def task_scores(config: ConfigDict, exp: Experiment, params: nnx.State, *, progress: bool = False,
                eval_step: EvalStep | None = None) -> dict:
  """Argmax accuracy on the answer tokens of each task in config.eval_tasks (passkey: per
  length and depth), whatever data the model was trained on; the tasks are written in byte tokens, so a model
  of another tokenizer skips them."""
  scores = {}
  tokenizer = config.get('tokenizer', BYTES)
  for task in config.get('eval_tasks', ()):
    if task not in data.synthetic.TASKS:
      raise ValueError(f'config.eval_tasks has unknown task {task!r}; known: {data.synthetic.TASKS}')
    if tokenizer != BYTES:
      scores[task] = f'skipped: the task is written in byte tokens, the model reads config.tokenizer={tokenizer!r}'
      continue
    grid = [(config.seq_len, -1.0)]
    if task == 'passkey':
      lengths = [k * config.seq_len for k in (1, 2, 4) if k * config.seq_len >= PASSKEY_MIN_LENGTH]
      grid = [(length, depth) for length in lengths for depth in PASSKEY_DEPTHS]
      if not grid:
        scores[task] = f'skipped: rows shorter than {PASSKEY_MIN_LENGTH} tokens'
    for seq_len, depth in grid:
      task_config = ConfigDict(config.to_dict())
      task_config.dataset.update(name=task, depth=depth)
      label = f'task {task}' + (f' (length {seq_len}, depth {depth})' if task == 'passkey' else '')
      evaluator = Evaluator(task_config, exp.graphdef, exp.batch_sharding, seq_len=seq_len,
                            num_batches=config.get('eval_batches', None), progress=label if progress else '',
                            eval_step=eval_step)
      eval_step = evaluator.eval_step  # the passkey depths share their lengths' compiles
      accuracy = evaluator(params)['accuracy']
      if task == 'passkey':
        scores.setdefault(task, {})[f'length{seq_len}_depth{depth}'] = accuracy
      else:
        scores[task] = accuracy
  return scores


def evaluate_checkpoint(config: ConfigDict, workdir: str, *, step: int | None = None,
                        split: str = 'validation', num_batches: int | None = None, progress: bool = False) -> dict:
  """Restores a checkpoint of `workdir` (the latest by default) and evaluates it; `progress` logs as it goes."""
  exp = Experiment.build(config)
  with exp.activate():
    step, state, data_state = read_checkpoint(workdir, exp.restore_target(), step)
    config = data.pin_build(config, data_state)  # the corpus build it trained on, if the files changed since
    dataset = data.describe(config)
    if progress:
      logging.info('evaluating the checkpoint of step %d on the %s split of %s', step, split, data.summarize(dataset))
    label = lambda what: what if progress else ''
    evaluator = Evaluator(config, exp.graphdef, exp.batch_sharding, split=split, num_batches=num_batches,
                          progress=label(f'{split} split'))
    results = evaluator(state.params)
    extrapolation = {}
    for factor in config.get('eval_extrapolation', ()):
      longer = Evaluator(config, exp.graphdef, exp.batch_sharding, split=split, seq_len=factor * config.seq_len,
                         num_batches=config.get('eval_batches', None), eval_step=evaluator.eval_step,
                         progress=label(f'{factor}x longer rows ({factor * config.seq_len} tokens)'))
      extrapolation[f'{factor}x'] = dict(seq_len=factor * config.seq_len, **longer(state.params))
    tasks = task_scores(config, exp, state.params, progress=progress, eval_step=evaluator.eval_step)
  return dict(step=step, split=split, seq_len=config.seq_len, dataset=dataset, **results,
              extrapolation=extrapolation, tasks=tasks, unigram_entropy_bits=data.corpus_unigram_entropy_bits(config))


def write_results(workdir: str | epath.Path, results: dict) -> list[str]:
  """Writes `eval_<step>.json` (`eval_<split>_<step>.json` off the validation split), and `eval.json` too unless
  that holds a newer step: an older checkpoint's evaluation never replaces a newer one. Returns the paths."""
  workdir = paths.as_path(workdir)
  split, step = results['split'], results['step']
  written = [workdir / (f'eval_{step}.json' if split == 'validation' else f'eval_{split}_{step}.json')]
  latest = workdir / 'eval.json'
  try:
    latest_step = json.loads(latest.read_text()).get('step', -1)
  except (OSError, ValueError, AttributeError):  # none yet, or unreadable
    latest_step = -1
  if split == 'validation' and step >= latest_step:
    written.append(latest)
  elif split == 'validation':
    logging.warning('%s holds the evaluation of a newer step (%d): kept; this one (step %d) is in %s',
                    latest, latest_step, step, written[0])
  for path in written:
    paths.write_text_atomically(path, json.dumps(results, indent=2))
  return [str(path) for path in written]
