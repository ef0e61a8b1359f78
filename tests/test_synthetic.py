"""Synthetic tasks: the generated answers are right (checked by brute force),
rows are deterministic, and training on a task counts only its answers."""
import numpy as np
import pytest

from tests.helpers import tiny_experiment
from trainers import data
from trainers.data.synthetic import NOISE, SEPARATOR, TaskRows
from trainers.training import steps


def solve_mqar(tokens: np.ndarray, num_pairs: int) -> dict[int, int]:
  """Brute force: read the pairs at the start; answer every later key by lookup."""
  table = {}
  for i in range(num_pairs):
    assert tokens[2 * i] not in table, 'keys must be distinct'
    table[int(tokens[2 * i])] = int(tokens[2 * i + 1])
  answers = {}
  for i in range(2 * num_pairs, len(tokens) - 1):
    if int(tokens[i]) in table:
      answers[i + 1] = table[int(tokens[i])]
  return answers


@pytest.mark.parametrize('index', range(20))
def test_mqar_answers_match_a_brute_force_solver(index):
  row = TaskRows('mqar', 127, seed=3, num_pairs=12)[index]
  answers = solve_mqar(row['tokens'], 12)
  assert sorted(answers) == list(np.flatnonzero(row['answer']))
  assert all(row['tokens'][i] == v for i, v in answers.items())
  np.testing.assert_array_equal(row['positions'], np.arange(128))


def test_passkey_answer_is_the_key_at_the_depth():
  for depth in (0.0, 0.5, 1.0):
    row = TaskRows('passkey', 255, seed=0, depth=depth)[7]
    text = bytes(row['tokens'].astype(np.uint8))
    key = text[text.index(b'The pass key is ') + 16:][:5]
    assert bytes(row['tokens'][row['answer']].astype(np.uint8)) == key and key.isdigit()
    assert abs(text.index(b'The pass key is') / (len(text) - 110) - depth) < 0.1


def test_selective_copy_answers_are_the_letters_in_order():
  row = TaskRows('selective_copy', 63, seed=1, num_tokens=6)[2]
  tokens = row['tokens']
  separator = int(np.flatnonzero(tokens == SEPARATOR)[0])
  letters = [t for t in tokens[:separator] if t != NOISE]
  np.testing.assert_array_equal(tokens[row['answer']], letters)
  assert len(letters) == 6 and row['answer'][separator + 1:].all()


def test_rows_are_deterministic_and_splits_differ(data_dir):
  config = tiny_experiment(data_dir, **{'dataset.name': 'mqar'})
  first, = data.make_eval_batches(config, num_batches=1)
  again, = data.make_eval_batches(config, num_batches=1)
  np.testing.assert_array_equal(first['tokens'], again['tokens'])
  train = data.make_train_iterator(config)
  assert not np.array_equal(next(train)['tokens'], first['tokens'])
  train.close()


def test_training_on_a_task_counts_only_answers(data_dir):
  config = tiny_experiment(data_dir, **{'dataset.name': 'selective_copy'})
  iterator = data.make_train_iterator(config)
  batch = next(iterator)
  iterator.close()
  *_, weights = steps.split_batch(batch)
  np.testing.assert_array_equal(np.asarray(weights), batch['answer'][:, 1:])


def test_bad_task_parameters_name_the_field(data_dir):
  with pytest.raises(ValueError, match=r'config\.dataset\.num_pairs=20'):
    data.make_train_iterator(tiny_experiment(data_dir, **{'dataset.name': 'mqar', 'dataset.num_pairs': 20}))
