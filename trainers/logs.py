"""Keeps the binaries' logs readable: this project's INFO lines, only warnings
and errors from libraries (orbax and tfds log every save and read), no TPU
probe on a machine without accelerators (below), and no silent compile: a
program's first call (minutes for a large model) is announced and timed
(`compiling`). (tfds progress bars are turned off where a corpus is built:
trainers/data/local_text.py.)"""
import contextlib
import glob
import logging as py_logging
import os
import time
from collections.abc import Iterator

import jax
from absl import logging

_PROJECT_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
                      for d in ('trainers', 'experiments', 'architectures', 'layers'))


def _keep(record: py_logging.LogRecord) -> bool:
  return record.levelno >= py_logging.ERROR or record.pathname.startswith(_PROJECT_DIRS) or (
      record.levelno >= py_logging.WARNING and 'tensorflow_datasets' not in record.pathname)


def has_accelerator() -> bool:
  """A TPU chip (on the PCI bus, or an /dev/accel* device), an NVIDIA GPU or an AMD GPU, by jax's own probes."""
  try:
    from jax._src import hardware_utils  # the probes jax runs itself; no public API has them before a backend starts
    return bool(hardware_utils.num_available_tpu_chips_and_device_id()[0] or glob.glob('/dev/accel*')
                or hardware_utils.has_visible_nvidia_gpu() or hardware_utils.num_available_amd_gpus(stop_at=1))
  except (ImportError, AttributeError, OSError):  # another jax: assume there may be one
    return True


def skip_tpu_probe_without_accelerators() -> None:
  """Without JAX_PLATFORMS, jax starts every backend it has a plugin for: with the libtpu wheel installed (the
  test extra has it) that includes the TPU one, and libtpu, finding no TPU, prints "INVALID_ARGUMENT: unexpected
  worker hostname" lines before giving up quietly. On a machine with no accelerator at all this picks the CPU
  platform up front; anywhere else, or when the user chose platforms, it changes nothing. Call it before the
  first use of a device."""
  if not jax.config.jax_platforms and not has_accelerator():
    jax.config.update('jax_platforms', 'cpu')


def quiet_library_logs() -> None:
  """Everything this module's docstring lists; call it first in a binary's main."""
  logging.get_absl_handler().addFilter(_keep)
  skip_tpu_probe_without_accelerators()


@contextlib.contextmanager
def compiling(program: str) -> Iterator[None]:
  """Logs (process 0) that `program` compiles, then how long its first call took; the block makes that call and
  waits for its result."""
  lead = jax.process_index() == 0
  if lead:
    logging.info('compiling %s', program)
  start = time.perf_counter()
  yield
  if lead:
    logging.info('compiled %s and ran it once in %.1f s', program, time.perf_counter() - start)
