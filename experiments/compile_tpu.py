"""Compiles a config's sharded train and decode steps for a TPU topology, on any host.

  pip install -e '.[tpu]'     # libtpu: lets a CPU-only machine compile for TPUs
  python -m experiments.compile_tpu --config=experiments/configs/transformer.py:150m \\
      --config.mesh.fsdp=-1 --config.mesh.data=1 --topology=v5p:2x2x1 --search_batch --output=tpu.json

Prints per-chip memory (arguments, outputs, temporaries) and whether it fits
the chip's HBM; with --search_batch, the largest batch that fits.
"""
import json
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile for TPU; nothing runs here

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import flag_parsing  # noqa: E402
from trainers.measurement.tpu_compile import compile_report, largest_batch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:size].', lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', 'v5e:2x4', 'TPU topology, e.g. v5e:2x4, v5p:2x2x1, v4:2x2x1.')
_SEARCH = flags.DEFINE_bool('search_batch', False, 'Also find the largest batch whose train step fits.')
_CONTEXT = flags.DEFINE_integer('decode_context', None, 'Decode cache length (default: seq_len).')
_OUTPUT = flags.DEFINE_string('output', None, 'Where to write the JSON report.')

def main():
  report = compile_report(_CONFIG.value, _TOPOLOGY.value, decode_context=_CONTEXT.value)
  if _SEARCH.value:
    report['largest_batch_that_fits'] = largest_batch(_CONFIG.value, _TOPOLOGY.value)
  print(json.dumps(report, indent=2))
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      json.dump(report, f, indent=2)

if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  flag_parsing.run(main)
