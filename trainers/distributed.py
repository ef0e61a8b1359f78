"""Joining a multi-host (multi-controller) JAX run.

Every host runs the same binary; `jax.distributed.initialize` connects them
through a coordinator (process 0), after which `jax.devices()` lists every
host's devices and each process feeds its own rows of the global batch.
With no address given, JAX reads the cluster's environment (Cloud TPU, Slurm,
Open MPI, Kubernetes); locally, pass the address, process count and id.
"""
import jax
from absl import logging


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> None:
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ValueError('--coordinator_address, --num_processes and --process_id go together '
                     '(or give none of them to let JAX read the cluster environment)')
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout_s)
  logging.info('joined a run of %d processes as process %d (%d local / %d global devices)',
               jax.process_count(), jax.process_index(), jax.local_device_count(), jax.device_count())
