"""Flags shared by the binaries for joining a multi-host run (see trainers/distributed.py)."""
from absl import flags

from trainers import distributed

_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Join a multi-host run (jax.distributed.initialize). Without the three flags '
    'below JAX reads the cluster environment (Cloud TPU, Slurm, Open MPI, Kubernetes).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, e.g. 10.0.0.1:1234.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')


def maybe_initialize() -> None:
  if _DISTRIBUTED.value:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
