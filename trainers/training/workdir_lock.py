"""One trainer per workdir: `<workdir>/lock`, created atomically, names its holder.

The lock is a JSON file {host, pid, started}. A second trainer refuses at once
(`WorkdirLockedError`, one line naming the holder and since when). A lock
whose holder is gone is stale and taken over with a warning: on the same host
when that pid no longer runs (or is this very process: a restarted container
reuses pids); from another host only with `--force_unlock` (or by removing the
file), since its pids cannot be checked from here. Only process 0 of a
multi-host run takes it; the others learn whether it did. It is released when
training ends, by an error, or by SIGTERM (outside the step loop, which saves
first: trainers/training/train_loop.py); a SIGKILL leaves it stale for the next start.

On a local disk the create is exclusive (O_EXCL); an object store (gs://) has
no exclusive create through epath, so there the lock is written, then read
back: two starts within the same instant may both pass (best effort).
"""
import contextlib
import dataclasses
import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from trainers import paths

FILENAME = 'lock'


class WorkdirLockedError(RuntimeError):
  """Another trainer holds the workdir."""


@dataclasses.dataclass(frozen=True)
class Holder:
  host: str
  pid: int
  started: str  # ISO 8601, UTC

  @classmethod
  def this_process(cls) -> 'Holder':
    return cls(socket.gethostname(), os.getpid(), datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec='seconds'))

  def describe(self) -> str:
    return f'host {self.host}, pid {self.pid}, since {self.started}'

  def is_gone(self) -> bool:
    """Whether this holder surely runs no more: a pid of this host that is not running, or is this process."""
    if self.host != socket.gethostname():
      return False
    if self.pid == os.getpid():
      return True
    try:
      os.kill(self.pid, 0)
    except ProcessLookupError:
      return True
    except PermissionError:  # running, as another user
      return False
    return False


def _read(lock: epath.Path) -> Holder | None:
  """The lock's holder; None if the lock has gone meanwhile or is being written (created, still empty). Raises
  WorkdirLockedError if it holds something else."""
  try:
    text = lock.read_text()
    return Holder(**json.loads(text)) if text else None
  except FileNotFoundError:
    return None
  except (ValueError, TypeError) as error:
    raise WorkdirLockedError(f'{lock} is not a lock this code wrote ({error}); if no trainer runs in '
                             f'{lock.parent}, remove it or pass --force_unlock') from error


def _create(lock: epath.Path, holder: Holder) -> bool:
  """Creates `lock` holding `holder`; False if it exists already."""
  text = json.dumps(dataclasses.asdict(holder))
  if paths.is_local(lock):
    try:
      fd = os.open(os.fspath(lock), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return True
  if lock.exists():
    return False
  lock.write_text(text)
  return _read(lock) == holder


def _take(workdir: epath.Path, force: bool) -> Holder:
  lock = workdir / FILENAME
  workdir.mkdir(parents=True, exist_ok=True)
  me = Holder.this_process()
  for _ in range(3):  # a holder that just released, or a stale lock set aside, lets the next try through
    if _create(lock, me):
      return me
    holder = _read(lock)
    if holder is None:
      time.sleep(0.1)  # gone, or its creator is writing it
      continue
    if not (force or holder.is_gone()):
      raise WorkdirLockedError(
          f'{workdir} is in use by another trainer ({holder.describe()}); wait for it to end, or if it no '
          f'longer runs (on another host), pass --force_unlock (or remove {lock})')
    aside = workdir / f'{FILENAME}.{me.pid}.stale'  # moved, not deleted: another start may have replaced it
    try:
      lock.rename(aside)
    except FileNotFoundError:
      continue
    moved = _read(aside)
    if moved not in (holder, None):  # another start took over first: its lock goes back
      aside.rename(lock)
      raise WorkdirLockedError(f'{workdir} is in use by another trainer ({moved.describe()}), which took over '
                               f'the stale lock first')
    aside.unlink(missing_ok=True)
    logging.warning('took over the lock of %s from a trainer that %s (%s)', workdir,
                    'was forced out (--force_unlock)' if force else 'no longer runs', holder.describe())
  raise WorkdirLockedError(f'{workdir}: the lock {lock} changed hands 3 times while this start tried to take it; '
                           'another trainer is starting there')


def _release(workdir: epath.Path, me: Holder) -> None:
  lock = workdir / FILENAME
  try:
    if _read(lock) == me:
      lock.unlink(missing_ok=True)
  except WorkdirLockedError:  # someone replaced it with something else: not ours to remove
    pass


def _exit_on_sigterm(signum: int, frame) -> None:
  del frame
  sys.exit(128 + signum)  # unwinds through `hold`, which releases the lock


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, *, force: bool = False) -> Iterator[None]:
  """Holds `<workdir>/lock` (process 0) while the block runs; raises WorkdirLockedError if another holds it."""
  workdir = paths.as_path(workdir)
  me = error = None
  if jax.process_index() == 0:
    try:
      me = _take(workdir, force)
    except Exception as e:  # noqa: BLE001 (raised below, once the other processes know)
      error = e
  if jax.process_count() > 1:  # every process learns whether process 0 holds the lock
    taken = bool(multihost_utils.broadcast_one_to_all(np.int32(me is not None)))
    if not taken and error is None:
      raise WorkdirLockedError(f'{workdir}: process 0 could not take the lock (see its log)')
  if error is not None:
    raise error
  previous = None
  if me is not None and jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
  try:
    yield
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
    if me is not None:
      _release(workdir, me)
