"""Tests of the byte tokenizer."""
import numpy as np

from trainers.tokenizer import ByteTokenizer


def test_constants():
  tok = ByteTokenizer()
  assert tok.eos_id == 256
  assert tok.vocab_size == 257


def test_encode_is_utf8_bytes_without_eos():
  tok = ByteTokenizer()
  text = 'def f(x):\n  return "héllo, 日本"\n'
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, list(text.encode('utf-8')))
  np.testing.assert_array_equal(tok.encode(text.encode('utf-8')), ids)
  assert tok.encode('').shape == (0,)


def test_decode_roundtrip_drops_eos_and_replaces_bad_bytes():
  tok = ByteTokenizer()
  text = 'a\tb\n✓ ünïcödé'
  ids = np.concatenate([tok.encode(text), [tok.eos_id], tok.encode('x'), [tok.eos_id]])
  assert tok.decode(ids) == text + 'x'
  assert tok.decode([0x66, 0xff, 0x66]) == 'f\ufffdf'
  assert tok.decode(np.array([[104, 105]])) == 'hi'
