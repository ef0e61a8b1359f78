"""Synthetic tasks that probe what efficient architectures remember, as packed rows.

Each row is one document of exactly seq_len + 1 byte tokens, generated from
(seed, row index) alone, with an `answer` mask marking the tokens to predict:

* `mqar` (multi-query associative recall; Arora et al. 2023, Zoology): N
  key-value pairs, a stretch of filler, then every key again in a new order,
  each followed by its value (the answers).
* `passkey` (Mohtashami & Jaggi 2023): filler sentences with "The pass key
  is NNNNN." inserted at a depth (fraction of the row), and at the end "What
  is the pass key? The pass key is NNNNN" (the digits are the answers).
* `selective_copy` (Gu & Dao 2023, Mamba): N letters scattered among noise
  dots, a separator, then the letters in order (the answers).

Training on a task counts only the answer tokens in the loss; evaluation
reports the fraction of answer tokens the model's argmax gets right.
"""
import numpy as np

KEYS = np.frombuffer(b'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz', np.uint8)
VALUES = np.frombuffer(b'0123456789!#$%&*+-/<=>?@^~', np.uint8)
LETTERS = np.frombuffer(b'abcdefghijklmnopqrstuvwxyz', np.uint8)
FILLER = b'The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. '
SPACE, NOISE, SEPARATOR = ord(' '), ord('.'), ord('|')
TASKS = ('mqar', 'passkey', 'selective_copy')


def mqar(rng: np.random.Generator, length: int, num_pairs: int) -> tuple[np.ndarray, np.ndarray]:
  if not 1 <= num_pairs <= len(KEYS) or 4 * num_pairs > length:
    raise ValueError(f'config.dataset.num_pairs={num_pairs}: mqar needs 1 <= num_pairs <= {len(KEYS)} and '
                     f'4 * num_pairs <= seq_len + 1 = {length}')
  keys = rng.choice(KEYS, num_pairs, replace=False)
  values = rng.choice(VALUES, num_pairs)
  order = rng.permutation(num_pairs)
  tokens = np.full(length, SPACE, np.int32)
  tokens[0:2 * num_pairs:2], tokens[1:2 * num_pairs:2] = keys, values
  start = length - 2 * num_pairs
  tokens[start::2], tokens[start + 1::2] = keys[order], values[order]
  answer = np.zeros(length, bool)
  answer[start + 1::2] = True
  return tokens, answer


def passkey(rng: np.random.Generator, length: int, depth: float) -> tuple[np.ndarray, np.ndarray]:
  key = b'%05d' % rng.integers(0, 100000)
  needle = b'The pass key is ' + key + b'. Remember it. ' + key + b' is the pass key. '
  question = b' What is the pass key? The pass key is ' + key
  room = length - len(needle) - len(question)
  if room < 0:
    raise ValueError(f'config.seq_len + 1 = {length} is too short for passkey (needs {len(needle) + len(question)})')
  filler = (FILLER * (room // len(FILLER) + 1))[:room]
  at = int(round((rng.uniform() if depth < 0 else depth) * room))
  text = filler[:at] + needle + filler[at:] + question
  answer = np.zeros(length, bool)
  answer[-len(key):] = True
  return np.frombuffer(text, np.uint8).astype(np.int32), answer


def selective_copy(rng: np.random.Generator, length: int, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  prefix = length - num_tokens - 1
  if num_tokens < 1 or prefix < num_tokens:
    raise ValueError(f'config.dataset.num_tokens={num_tokens}: selective_copy needs 1 <= num_tokens and '
                     f'2 * num_tokens + 1 <= seq_len + 1 = {length}')
  letters = rng.choice(LETTERS, num_tokens)
  tokens = np.full(length, NOISE, np.int32)
  tokens[np.sort(rng.choice(prefix, num_tokens, replace=False))] = letters
  tokens[prefix] = SEPARATOR
  tokens[prefix + 1:] = letters
  answer = np.zeros(length, bool)
  answer[prefix + 1:] = True
  return tokens, answer


VALIDATION_SEED_OFFSET = 1_000_003  # validation rows come from another seed than training rows


def task_rows(config, split: str, seq_len: int | None = None) -> 'TaskRows':
  """The rows of task `config.dataset.name` for a split, with the task's fields from config.dataset."""
  params = {k: config.dataset[k] for k in ('num_pairs', 'depth', 'num_tokens') if k in config.dataset}
  seed = config.seed + (VALIDATION_SEED_OFFSET if split != 'train' else 0)
  return TaskRows(config.dataset.name, seq_len or config.seq_len, seed, **params)


class TaskRows:
  """rows[i] -> {'tokens', 'positions', 'answer', 'token_bytes'} of seq_len + 1 entries, from (seed, i) alone
  (every token is one byte)."""

  def __init__(self, task: str, seq_len: int, seed: int, *, num_pairs: int = 8, depth: float = -1.0,
               num_tokens: int = 8):
    if task not in TASKS:
      raise ValueError(f'unknown synthetic task {task!r}; known: {TASKS}')
    self.task, self.seq_len, self.seed = task, seq_len, seed
    self.identity = f'synthetic/{task}/pairs{num_pairs}_depth{depth}_tokens{num_tokens}'
    self.rows_per_epoch = 1 << 40  # endless: every row is new
    self._make = {'mqar': lambda rng, n: mqar(rng, n, num_pairs),
                  'passkey': lambda rng, n: passkey(rng, n, depth),
                  'selective_copy': lambda rng, n: selective_copy(rng, n, num_tokens)}[task]
    self[0]  # check the parameters now: a bad one is a config error, not a crash mid-run

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    tokens, answer = self._make(np.random.default_rng([self.seed, int(index)]), self.seq_len + 1)
    return dict(tokens=tokens, positions=np.arange(self.seq_len + 1, dtype=np.int32), answer=answer,
                token_bytes=np.ones(self.seq_len + 1, np.int32))
