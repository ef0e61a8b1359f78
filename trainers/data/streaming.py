"""Long-document streaming: each batch row reads consecutive segments of its own stream.

The training documents are dealt once, by a seeded permutation, to B lanes
(one per global batch row). Lane j shuffles its documents every epoch and
concatenates them (tokens + EOS); its k-th segment is the stream slice
[k*L, k*L + L + 1), so at step k row j continues exactly where step k - 1
left off, and a model can carry its cache from one step to the next
(Transformer-XL, Block-Recurrent Transformer). Positions restart at 0 where a
document starts inside a segment. Global row r = k*B + j, so the batching,
process slicing and checkpointable state of `pipeline.DataIterator` apply
unchanged.
"""
import numpy as np

from trainers.data import packing


class _Subset:
  """Documents `indices` of `docs`, as a random-access source."""

  def __init__(self, docs, indices: np.ndarray):
    self.docs, self.indices = docs, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    return self.docs[int(self.indices[i])]


class StreamRows:
  """`rows[k * lanes + j]` = segment k of lane j, as {'tokens', 'positions', 'token_bytes'} of L + 1 entries
  (`docs` and `eos_id` as for `packing.PackedRows`)."""

  def __init__(self, docs, doc_lengths, seq_len: int, *, lanes: int, seed: int, eos_id: int):
    doc_lengths = np.asarray(doc_lengths, np.int64)
    if len(doc_lengths) < lanes:
      raise ValueError(f'streaming needs at least one document per batch row: the split has {len(doc_lengths)} '
                       f'documents for config.batch_size={lanes}')
    deal = np.random.default_rng([seed, lanes]).permutation(len(doc_lengths))
    self.lanes = [packing.PackedRows(_Subset(docs, deal[j::lanes]), doc_lengths[deal[j::lanes]], seq_len,
                                     seed=seed * 1_000_003 + j, eos_id=eos_id, shuffle=True, shuffle_rows=False)
                  for j in range(lanes)]
    self.seq_len, self.seed = seq_len, seed
    # The iterator reports an epoch from this; lanes wrap around on their own schedules.
    self.rows_per_epoch = lanes * min(lane.rows_per_epoch for lane in self.lanes)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    segment, lane = divmod(int(index), len(self.lanes))
    return self.lanes[lane][segment]
