"""Metrics: one JSON object per log step in <workdir>/metrics.jsonl, optional
TensorBoard events (tensorboardX, needs no TensorFlow), and a one-line progress
log with step, loss, tokens/s, MFU and ETA.

MFU follows MaxText: 3x the analytic forward matmul FLOPs per token (forward
and backward), times tokens/s, over the devices' peak bf16 FLOP/s, counting
full causal attention over each row of seq_len. Rows that pack several
documents do less attention work than that (other documents' keys are
skipped), so on them this MFU overstates; the log line says "MFU (MaxText-style)".
`experiments/benchmark.py` also reports the MFU of the work done.
"""
import json
import time

import jax
from absl import logging
from etils import epath

from trainers import paths

# Peak dense bf16 FLOP/s per device, by a substring of `device.device_kind`.
PEAK_BF16_FLOPS = {
    'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L4': 121e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v6': 918e12,
}


def peak_flops(device: jax.Device) -> float | None:
  for kind, flops in PEAK_BF16_FLOPS.items():
    if kind.lower() in device.device_kind.lower():
      return flops
  return None


class MetricsWriter:
  """Appends records to metrics.jsonl (process 0 only). Where the workdir cannot append (an object store:
  gs://), each write replaces the file with all records so far."""

  def __init__(self, workdir: str | epath.Path, *, enabled: bool = True):
    workdir = paths.as_path(workdir)
    self.enabled = enabled
    self.path = workdir / 'metrics.jsonl'
    self.tensorboard = None
    self._lines: list[str] | None = None  # where the file cannot be appended to: its lines, kept to rewrite it
    if not enabled:
      return
    if not paths.is_local(workdir):
      self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
    workdir.mkdir(parents=True, exist_ok=True)
    try:
      import tensorboardX  # optional: pip install -e '.[tensorboard]'
      self.tensorboard = tensorboardX.SummaryWriter(str(workdir / 'tensorboard'))
    except ImportError:
      pass

  def drop_records_after(self, step: int) -> None:
    """On resume: records past the restored step are rewritten by the resumed run. A line that is not a record
    (not JSON, or no integer `step`) is dropped with a warning naming it, unless it is the last one, cut by a kill."""
    if not self.enabled or not self.path.exists():
      return
    text = self.path.read_text()
    kept = []
    for number, line in enumerate(text.splitlines(keepends=True), 1):
      record = _record(line)
      if record is None:
        if line.endswith('\n'):  # a whole line, not the last one cut mid-write
          logging.warning('%s line %d is not a metrics record (JSON with an integer "step"): dropped: %.80s',
                          self.path, number, line.strip())
      elif record['step'] <= step:
        kept.append(json.dumps(record) + '\n')
    paths.write_text_atomically(self.path, ''.join(kept))  # a kill now loses nothing
    if self._lines is not None:
      self._lines = kept

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in values.items() if v is not None}}
    line = json.dumps(record) + '\n'
    if self._lines is None:
      with self.path.open('a') as f:
        f.write(line)
    else:
      self._lines.append(line)
      paths.write_text_atomically(self.path, ''.join(self._lines))
    if self.tensorboard is not None:
      for key, value in record.items():
        if key != 'step':
          self.tensorboard.add_scalar(key, value, step)

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()


class Throughput:
  """Tokens/s, MFU (MaxText-style: `train_flops_per_token` of one document a row) and ETA between two
  log points (wall clock on the host)."""

  def __init__(self, *, train_flops_per_token: float, tokens_per_step: int, total_steps: int,
               devices: list[jax.Device]):
    self.train_flops_per_token = train_flops_per_token
    self.tokens_per_step = tokens_per_step
    self.total_steps = total_steps
    peaks = [peak_flops(d) for d in devices]
    self.peak = None if None in peaks else sum(peaks)
    self._time, self._step = time.perf_counter(), None

  def start(self, step: int) -> None:
    self._time, self._step = time.perf_counter(), step

  def measure(self, step: int) -> dict:
    now = time.perf_counter()
    steps = step - self._step
    if steps <= 0:
      return dict(tokens_per_s=None, mfu=None, eta_s=None)
    seconds = max(now - self._time, 1e-9)
    self._time, self._step = now, step
    tokens_per_s = steps * self.tokens_per_step / seconds
    mfu = None if self.peak is None else tokens_per_s * self.train_flops_per_token / self.peak
    return dict(tokens_per_s=tokens_per_s, mfu=mfu, eta_s=(self.total_steps - step) * seconds / max(steps, 1))


def _record(line: str) -> dict | None:
  """The metrics record of a metrics.jsonl line, or None if it is not one."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  return record if isinstance(record, dict) and type(record.get('step')) is int else None


def log_progress(step: int, total_steps: int, values: dict) -> None:
  mfu, eta, speed = values.get('mfu'), values.get('eta_s'), values.get('tokens_per_s')
  logging.info('step %d/%d  loss %.4f  %s tokens/s  MFU (MaxText-style) %s  ETA %s', step, total_steps, values['loss'],
               '-' if speed is None else f'{speed:.0f}', '-' if mfu is None else f'{100 * mfu:.1f}%',
               '-' if eta is None else f'{int(eta) // 60}m{int(eta) % 60:02d}s')
