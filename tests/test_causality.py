"""Causality and document isolation for every config (trainers/measurement/causality.py), with random weights.

Replacing the tokens at row index >= P moves no logit before P; replacing the first document of
a packed row moves no logit of the second. float32 on CPU: a leak must stay below 1e-5 (what
differs is summation order), while the replaced tokens move the other logits by far more. The
streaming configs (Transformer-XL, Block-Recurrent) are probed through a carried cache as well,
the path their training takes. The same probes ran on a GPU through cuDNN and the Pallas
kernels: `experiments.check_causality` (docs/quality.md).
"""
import jax
import pytest
from flax import nnx

from tests.helpers import CONFIGS, family_tiny_config
from trainers.experiment import Experiment
from trainers.measurement import causality

SEQ_LEN = 72  # > the tiny configs' windows, blocks and chunks, so the probes cross their borders


@pytest.mark.parametrize('name', CONFIGS)
def test_no_logit_sees_the_future_or_another_document(name, data_dir):
  config = family_tiny_config(name, data_dir, dict(data=1, fsdp=1, tensor=1))
  exp = Experiment.build(config, jax.devices()[:1])
  model = causality.with_random_weights(nnx.merge(exp.graphdef, jax.device_get(exp.new_state().params)))
  paths = [False, True] if config.streaming.enabled else [False]
  for with_cache in paths:
    result = causality.check(model, SEQ_LEN, with_cache=with_cache)
    for probe, numbers in result.items():
      where = f'{name}, {probe} probe{" through a carried cache" if with_cache else ""}: {numbers}'
      assert numbers['leak'] < 1e-5, f'leak: {where}'
      assert numbers['effect'] > 1e-2, f'the replaced tokens changed nothing: {where}'
