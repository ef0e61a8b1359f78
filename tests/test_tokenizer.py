"""Tokenizers: bytes and a tiny SentencePiece model trained offline on the embedded corpus. Round trips (exact
bytes back, non-ASCII included), the bytes each token stands for (summing to the text a batch holds; a byte
run's unchanged), the tokenized corpus keyed by the model, config errors, a short run trained, evaluated and
sampled with subwords (the workdir keeps the tokenizer; another one is refused), and experiments.train_tokenizer."""
import json
import math
import os
import pathlib
import subprocess
import sys
import sysconfig

import jax
import numpy as np
import pytest

from tests.helpers import REPO, read_metrics, stdlib_slice, tiny_experiment
from trainers import data, run_config, tokenizer
from trainers.data import local_text, sources
from trainers.experiment import Experiment
from trainers.run_config import WorkdirMismatchError, config_for, record_or_check
from trainers.tokenizer import ByteTokenizer
from trainers.training.evaluator import evaluate_checkpoint
from trainers.training.train_loop import train

NON_ASCII = ['déjà vu, naïve café — «guillemets» ½ €\n',
             '日本語のテキスト。中文，한국어\n\tindent  two  spaces  \n',
             'emoji 🙂🚀 and combining é (e + U+0301), a tab\there, CRLF\r\nend',
             'Ελληνικά και русский язык ✓✗\n']


def test_constants():
  tok = ByteTokenizer()
  assert tok.eos_id == 256
  assert tok.vocab_size == 257
  assert tok.identity == tokenizer.BYTES and tok.bos_id is None


def test_encode_is_utf8_bytes_without_eos():
  tok = ByteTokenizer()
  text = 'def f(x):\n  return "héllo, 日本"\n'
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, list(text.encode('utf-8')))
  np.testing.assert_array_equal(tok.encode(text.encode('utf-8')), ids)
  assert tok.encode('').shape == (0,)
  ids, token_bytes = tok.encode_with_bytes(text)
  np.testing.assert_array_equal(token_bytes, np.ones(len(text.encode('utf-8'))))


def test_decode_drops_eos_and_gives_every_byte_back():
  tok = ByteTokenizer()
  text = 'a\tb\n✓ ünïcödé'
  ids = np.concatenate([tok.encode(text), [tok.eos_id], tok.encode('x'), [tok.eos_id]])
  assert tok.decode(ids) == (text + 'x').encode('utf-8')
  assert tok.decode([0x66, 0xff, 0x66]) == b'f\xfff'
  assert tok.decode(np.array([[104, 105]])) == b'hi'


def _stdlib_files(count: int, non_ascii: bool) -> list[bytes]:
  """`count` files of the embedded corpus, spread over it, with (or without) non-ASCII bytes."""
  root = sysconfig.get_paths()['stdlib']
  relpaths = local_text.list_files(root, local_text.STDLIB_PATTERNS, local_text.STDLIB_EXCLUDED_DIRS)
  chosen = []
  for relpath in relpaths[::3]:
    text = pathlib.Path(root, relpath).read_bytes()
    if (max(text, default=0) >= 128) == non_ascii:
      chosen.append(text)
    if len(chosen) == count:
      break
  return chosen


def test_sentencepiece_round_trips_files_exactly(sentencepiece_model):
  tok = tokenizer.load(sentencepiece_model)
  assert tok.vocab_size == 400 and tok.identity.startswith('sentencepiece_') and tok.bos_id is None
  documents = _stdlib_files(4, non_ascii=True) + _stdlib_files(4, non_ascii=False) + [
      text.encode('utf-8') for text in NON_ASCII]
  assert len(documents) == 12
  total_bytes = total_tokens = 0
  for document in documents:
    ids, token_bytes = tok.encode_with_bytes(document)
    np.testing.assert_array_equal(ids, tok.encode(document))
    assert tok.decode(ids) == document  # exactly the bytes, whatever the script
    assert tok.decode(np.append(ids, tok.eos_id)) == document  # EOS (a control piece) is dropped
    assert token_bytes.sum() == len(document) and token_bytes.min() >= 0
    total_bytes, total_tokens = total_bytes + len(document), total_tokens + len(ids)
  assert tok.encode(NON_ASCII[0]).tolist() == tok.encode(NON_ASCII[0].encode('utf-8')).tolist()
  assert total_bytes / total_tokens > 1.3  # subwords: over a byte per token, even with 400 pieces


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """A local_text corpus: real code from the embedded corpus and non-ASCII texts."""
  root = tmp_path_factory.mktemp('corpus')
  for i, document in enumerate(stdlib_slice(60_000)):
    (root / f'code{i}.py').write_bytes(document)
  for i, text in enumerate(NON_ASCII * 3):
    (root / f'text{i}.txt').write_text(f'{i}: {text}', encoding='utf-8')
  return root


def corpus_config(corpus, data_dir, tokenizer_spec, **overrides):
  return tiny_experiment(data_dir, tokenizer=tokenizer_spec, **{
      'model.vocab_size': 512, 'dataset.name': 'local_text', 'dataset.path': str(corpus),
      'dataset.validation_fraction': 0.3, 'dataset.num_threads': 0, **overrides})


def complete_documents(batch: dict, eos_id: int):
  """(ids, token_bytes) of each document that starts and ends (EOS) inside a row of `batch`."""
  for tokens, positions, token_bytes in zip(batch['tokens'], batch['positions'], batch['token_bytes']):
    for start in np.flatnonzero(positions == 0):
      ends = np.flatnonzero(tokens[start:] == eos_id)
      if len(ends):
        yield tokens[start:start + ends[0]], token_bytes[start:start + ends[0] + 1]


def test_token_bytes_sum_to_the_text_a_batch_holds(corpus, data_dir, sentencepiece_model):
  config = corpus_config(corpus, data_dir, sentencepiece_model)
  tok = tokenizer.from_config(config)
  source = sources.open_split(config.dataset, 'validation')
  texts = [source[i] for i in range(len(source))]
  batches = list(data.make_eval_batches(config, batch_size=2, seq_len=512))
  found = 0
  for batch in batches:
    assert batch['token_bytes'].dtype == np.int32 and batch['tokens'].max() < tok.vocab_size
    assert not batch['token_bytes'][(batch['tokens'] == tok.eos_id) | (batch['positions'] < 0)].any()
    for ids, token_bytes in complete_documents(batch, tok.eos_id):
      text = tok.decode(ids)
      assert text in texts and token_bytes.sum() == len(text)  # bytes of the document's UTF-8 text, EOS 0
      found += 1
  assert found >= 3
  # Over the split: every token once (each row repeats the previous row's last token in column 0).
  stream_bytes = batches[0]['token_bytes'][0, 0] + sum(int(b['token_bytes'][:, 1:].sum()) for b in batches)
  assert stream_bytes == sum(map(len, texts))
  # The tokens were built once, under the build, in a folder named by the tokenizer; a data position is
  # keyed by it too, so that a byte run's position is refused.
  subword = data.make_train_iterator(config)
  store = pathlib.Path(source.cache_dir) / 'seqarch_tokens' / tok.identity
  assert sorted(p.name for p in store.iterdir()) == [f'{s}.text.{a}.npy' for s in ('train', 'validation')
                                                      for a in ('ids', 'offsets', 'token_bytes')]
  assert subword.get_state()['dataset'].endswith('/train/' + tok.identity)
  byte_state = data.make_train_iterator(corpus_config(corpus, data_dir, 'bytes')).get_state()
  assert byte_state['dataset'].endswith('/train')  # as before tokenizers: earlier byte runs resume
  with pytest.raises(ValueError, match='dataset='):
    subword.set_state(byte_state)
  assert data.describe(config)['tokenizer'] == tok.identity


def test_a_byte_run_counts_one_byte_per_token_but_eos(corpus, data_dir):
  """Regression: the byte counts of a byte run are what bits per byte divided by before tokenizers (every
  counted target below 256)."""
  config = corpus_config(corpus, data_dir, 'bytes')
  batches = list(data.make_eval_batches(config)) + list(data.make_eval_batches(config, split='train', num_batches=2))
  assert 'token_bytes' not in next(data.make_train_iterator(config))  # training reads no byte counts
  for batch in batches:
    weights = batch['positions'][:, 1:] > 0
    np.testing.assert_array_equal(batch['token_bytes'][:, 1:][weights], batch['tokens'][:, 1:][weights] < 256)
    assert not batch['token_bytes'][batch['positions'] < 0].any()


@pytest.mark.fault('config.tokenizer a missing file or not a SentencePiece model; a tokenizer vocabulary larger than '
                   'config.model.vocab_size; a subword tokenizer for a synthetic task (written in bytes)',
                   'ValueError of one line naming the field, raised before anything compiles')
def test_tokenizer_config_errors_are_one_line(data_dir, tmp_path, sentencepiece_model, monkeypatch):
  not_a_model = tmp_path / 'words.model'
  not_a_model.write_text('not a model')
  cases = [(dict(tokenizer=str(tmp_path / 'missing.model')), r"config\.tokenizer='.*missing\.model': no such file"),
           (dict(tokenizer=str(not_a_model)), r"config\.tokenizer='.*words\.model': not a SentencePiece model"),
           (dict(tokenizer=sentencepiece_model, **{'model.vocab_size': 384}),
            r'config\.model\.vocab_size=384: the SentencePiece model .*tiny\.model \(config\.tokenizer\) needs at '
            'least 400'),
           (dict(tokenizer=sentencepiece_model, **{'model.vocab_size': 512, 'dataset.name': 'mqar'}),
            r"config\.tokenizer='.*': the synthetic task config\.dataset\.name='mqar' is written in byte tokens")]
  compiled = []
  monkeypatch.setattr(jax, 'jit', lambda *a, **k: compiled.append(a))
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message) as error:
      Experiment.build(tiny_experiment(data_dir, **overrides))
    assert '\n' not in str(error.value)
  assert not compiled


@pytest.mark.fault('a run resumed, evaluated or sampled with another tokenizer than it was trained with; the '
                   "tokenizer's file deleted after training",
                   'refused naming both tokenizers; evaluate and sample read the copy in the workdir')
def test_train_evaluate_and_sample_with_subwords(corpus, data_dir, tmp_path, sentencepiece_model):
  model_file = tmp_path / 'gone.model'
  model_file.write_bytes(pathlib.Path(sentencepiece_model).read_bytes())
  config = corpus_config(corpus, data_dir, str(model_file), total_steps=4, log_every=2, eval_every=4,
                         checkpoint_every=4, eval_batches=1)
  workdir = tmp_path / 'run'
  train(config, str(workdir))
  assert (workdir / run_config.TOKENIZER_FILENAME).read_bytes() == model_file.read_bytes()
  assert json.loads((workdir / run_config.FILENAME).read_text())['tokenizer'] == str(model_file)
  records = read_metrics(str(workdir))
  assert records[-1]['step'] == 4 and 0 < records[-1]['eval_bits_per_byte'] < records[-1]['eval_loss'] / math.log(2)
  model_file.unlink()  # evaluate and sample need nothing outside the workdir
  recorded = config_for(str(workdir), None, check_dataset=True)
  assert recorded.tokenizer == str(workdir / run_config.TOKENIZER_FILENAME)
  results = evaluate_checkpoint(recorded, str(workdir), num_batches=1)
  identity = tokenizer.from_config(recorded).identity
  assert results['dataset']['tokenizer'] == identity and results['step'] == 4
  assert results['loss'] / math.log(2) > results['bits_per_byte'] > 0  # more than a byte per token
  assert all(score.startswith('skipped: the task is written in byte tokens') for score in results['tasks'].values())
  sampled = subprocess.run([sys.executable, '-m', 'experiments.sample', f'--workdir={workdir}', '--prompt=déjà ',
                            '--max_new_tokens=6', '--temperature=0'], cwd=REPO, capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert sampled.stdout.startswith("--- 'déjà '\ndéjà ")
  # Another tokenizer is refused at resume, and for evaluate and sample, naming both; the same model file
  # under another name is the same tokenizer.
  byte_config = corpus_config(corpus, data_dir, 'bytes')
  with pytest.raises(WorkdirMismatchError, match=rf'trained with the tokenizer {identity} .*, not bytes'):
    record_or_check(byte_config, str(workdir))
  with pytest.raises(WorkdirMismatchError, match=rf'trained with the tokenizer {identity} .*, not bytes'):
    config_for(str(workdir), byte_config, check_dataset=False)
  record_or_check(corpus_config(corpus, data_dir, sentencepiece_model), str(workdir))


def test_train_tokenizer_binary(corpus, data_dir, tmp_path):
  output = tmp_path / 'models' / 'corpus.model'
  process = subprocess.run(
      [sys.executable, '-m', 'experiments.train_tokenizer', f'--input={corpus}', f'--output={output}',
       '--vocab_size=420', '--model_type=bpe', f'--data_dir={data_dir}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert process.returncode == 0, process.stderr[-3000:]
  tok = tokenizer.load(str(output))
  assert tok.vocab_size <= 420
  assert f'--config.tokenizer={output} and --config.model.vocab_size={tok.vocab_size}' in process.stderr
  assert 'bytes per token on the' in process.stderr
  for text in NON_ASCII:
    assert tok.decode(tok.encode(text)) == text.encode('utf-8')
