"""Time-series forecasting data, generated reproducibly: the Mackey-Glass system.

    x(t + 1) = x(t) + beta x(t - tau) / (1 + x(t - tau)^n) - gamma x(t)

(Mackey & Glass 1977; the discretised form used in forecasting benchmarks),
beta = 0.2, gamma = 0.1, n = 10, chaotic for tau >= 17. Channel c uses
tau = 17 + 6c, so `config.dataset.features` channels differ. One series of
LENGTH steps per channel is generated once; each channel is standardised with
the training part's mean and deviation. The first 80% of the time axis trains
(windows at seeded random offsets), the last 20% validates (consecutive
windows). A row is {'values': float32[L + 1, F], 'positions': 0 .. L}: the
model reads values[:-1] and predicts values[1:].
"""
import functools

import numpy as np

DATASETS = ('mackey_glass',)
LENGTH = 20_000
TRAIN_FRACTION = 0.8
_WARMUP = 500  # transient steps dropped before the series starts


@functools.lru_cache(maxsize=4)
def mackey_glass(features: int, length: int = LENGTH) -> np.ndarray:
  """float32 [length, features], standardised with the training part's statistics."""
  series = np.zeros((length, features), np.float32)
  for channel in range(features):
    tau = 17 + 6 * channel
    x = [1.2 + 0.01 * channel] * (tau + 1)
    for _ in range(_WARMUP + length):
      delayed = x[-tau - 1]
      x.append(x[-1] + 0.2 * delayed / (1.0 + delayed ** 10) - 0.1 * x[-1])
    series[:, channel] = x[-length:]
  train = series[:int(length * TRAIN_FRACTION)]
  return (series - train.mean(0)) / train.std(0)


class SeriesRows:
  """rows[i] -> {'values', 'positions'}: random training windows, or consecutive validation windows."""

  def __init__(self, features: int, seq_len: int, seed: int, split: str):
    if features < 1:
      raise ValueError(f'config.dataset.features={features}: must be >= 1')
    series = mackey_glass(features)
    cut = int(len(series) * TRAIN_FRACTION)
    self.series = series[:cut] if split == 'train' else series[cut:]
    self.seq_len, self.seed, self.train = seq_len, seed, split == 'train'
    windows = len(self.series) - seq_len - 1
    if windows < 1:
      raise ValueError(f'config.seq_len={seq_len} is longer than the {split} part of the series ({len(self.series)})')
    self.rows_per_epoch = windows if self.train else (len(self.series) - 1) // seq_len
    self.identity = f'timeseries/mackey_glass/f{features}'

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if self.train:
      start = int(np.random.default_rng([self.seed, int(index)]).integers(0, self.rows_per_epoch + 1))
    else:
      start = int(index) * self.seq_len
    return dict(values=self.series[start:start + self.seq_len + 1].copy(),
                positions=np.arange(self.seq_len + 1, dtype=np.int32))


def series_rows(config, split: str, seq_len: int | None = None) -> SeriesRows:
  return SeriesRows(config.dataset.get('features', 1), seq_len or config.seq_len, config.seed, split)
