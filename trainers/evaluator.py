"""Held-out evaluation: loss (nats/token), perplexity and bits per byte.

bits/byte = (summed nats over all counted targets) / ln 2 / (number of byte
targets); end-of-document predictions count in the loss but are not bytes.
"""
import math
import os

import jax
from flax import nnx
from ml_collections import ConfigDict

from trainers import data, steps
from trainers.checkpoints import Checkpointer
from trainers.experiment import Experiment


class Evaluator:
  """Jits the eval step once; call it with the params to evaluate."""

  def __init__(self, config: ConfigDict, graphdef: nnx.GraphDef, batch_sharding: jax.sharding.NamedSharding,
               *, split: str = 'validation', num_batches: int | None = None):
    self.config = config
    self.split = split
    self.num_batches = num_batches
    self.batch_sharding = batch_sharding
    self._step = jax.jit(steps.make_eval_step(graphdef))

  def __call__(self, params: nnx.State) -> dict:
    totals = None
    batches = data.make_eval_batches(self.config, split=self.split, num_batches=self.num_batches,
                                     process_index=jax.process_index(), process_count=jax.process_count())
    for batch in batches:
      device_batch = {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}
      sums = self._step(params, device_batch)  # summed on device: one host transfer at the end
      totals = sums if totals is None else jax.tree.map(jax.numpy.add, totals, sums)
    if totals is None:
      raise ValueError(f'the {self.split!r} split yielded no evaluation batches')
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    loss = totals['loss_sum'] / max(totals['target_count'], 1.0)
    return dict(loss=loss, perplexity=math.exp(min(loss, 50.0)),
                bits_per_byte=totals['loss_sum'] / math.log(2) / max(totals['byte_count'], 1.0),
                target_tokens=totals['target_count'])




def evaluate_checkpoint(config: ConfigDict, workdir: str, *, step: int | None = None,
                        split: str = 'validation', num_batches: int | None = None) -> dict:
  """Restores a checkpoint of `workdir` (the latest by default) and evaluates it."""
  exp = Experiment.build(config)
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=1, keep=1 << 30)
  with exp.activate():
    if step is None:
      restored = checkpointer.restore_latest(exp.restore_target())
      if restored is None:
        raise FileNotFoundError(f'no checkpoint under {workdir}/checkpoints to evaluate; train first')
      step, state, _ = restored
    else:
      state, _ = checkpointer.restore(step, exp.restore_target())
    results = Evaluator(config, exp.graphdef, exp.batch_sharding, split=split, num_batches=num_batches)(state.params)
  checkpointer.close()
  return dict(step=step, split=split, **results,
              unigram_entropy_bits=data.corpus_unigram_entropy_bits(config))
