"""The evaluator against a hand computation on a fixed tiny model; evaluation files never replace a newer
step's."""
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers import jitted, tiny_experiment
from trainers import data
from trainers.experiment import Experiment
from trainers.training.evaluator import Evaluator


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_bits_per_byte_and_loss_by_position_by_hand(data_dir):
  config = tiny_experiment(data_dir, mesh=dict(data=1, fsdp=1, tensor=1), **{'model.dtype': 'float32'})
  exp = Experiment.build(config, jax.devices()[:1])
  with exp.activate():
    params = exp.new_state().params
    results = Evaluator(config, exp.graphdef, exp.batch_sharding, num_batches=3)(params)
  forward = jitted(nnx.merge(exp.graphdef, jax.device_get(params)))
  nats, targets_counted, bytes_counted, by_context = 0.0, 0, 0, {}
  for batch in data.make_eval_batches(config, num_batches=3):
    tokens, positions = batch['tokens'], batch['positions']
    logits = np.asarray(forward(tokens[:, :-1], positions[:, :-1])[0], np.float64)
    logp = log_softmax(logits)
    for b in range(tokens.shape[0]):
      for t in range(tokens.shape[1] - 1):
        if positions[b, t + 1] <= 0:  # padding or a document's first token: not predicted
          continue
        loss = -logp[b, t, tokens[b, t + 1]]
        nats += loss
        targets_counted += 1
        bytes_counted += int(tokens[b, t + 1] < 256)
        context = min(positions[b, t + 1], t + 1)
        bucket = int(math.floor(math.log2(context)))
        by_context.setdefault(bucket, []).append(loss)
  assert results['target_tokens'] == targets_counted
  assert results['loss'] == pytest.approx(nats / targets_counted, rel=1e-5)
  assert results['bits_per_byte'] == pytest.approx(nats / math.log(2) / bytes_counted, rel=1e-5)
  assert [(r['first'], r['count']) for r in results['loss_by_position']] == [
      (2 ** b, len(v)) for b, v in sorted(by_context.items())]
  for row, (b, losses) in zip(results['loss_by_position'], sorted(by_context.items())):
    assert row['loss'] == pytest.approx(np.mean(losses), rel=1e-5)


@pytest.mark.fault('evaluating an older checkpoint after a newer one',
                   'its results go to eval_<step>.json; eval.json keeps the newest step (a warning says so)')
def test_an_older_step_never_replaces_a_newer_eval(tmp_path):
  """Issue 30.4: evaluating an older checkpoint overwrote eval.json; now each step has its file and eval.json
  is the newest step's."""
  from trainers.training.evaluator import write_results
  newer, older = dict(split='validation', step=4, loss=1.0), dict(split='validation', step=2, loss=2.0)
  assert write_results(str(tmp_path), newer) == [str(tmp_path / 'eval_4.json'), str(tmp_path / 'eval.json')]
  assert write_results(str(tmp_path), older) == [str(tmp_path / 'eval_2.json')]
  assert write_results(str(tmp_path), dict(newer, split='train')) == [str(tmp_path / 'eval_train_4.json')]
  read = lambda name: json.loads((tmp_path / name).read_text())
  assert read('eval.json') == read('eval_4.json') == newer and read('eval_2.json') == older
