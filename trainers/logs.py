"""Keeps the binaries' logs readable: this project's INFO lines, and only
warnings and errors from libraries (orbax and tfds log every save and read)."""
import logging as py_logging
import os

from absl import logging

_PROJECT_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
                      for d in ('trainers', 'experiments', 'architectures', 'layers'))


def _keep(record: py_logging.LogRecord) -> bool:
  return record.levelno >= py_logging.ERROR or record.pathname.startswith(_PROJECT_DIRS) or (
      record.levelno >= py_logging.WARNING and 'tensorflow_datasets' not in record.pathname)


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_keep)
