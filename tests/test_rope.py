"""RoPE, standard and interleaved, against rotations written out by hand."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from layers.blocks.rope import apply_rope
from tests.helpers import jitted, tiny_model

X = [1.0, 2.0, 3.0, 4.0]
P = 3.0
T0, T1 = P * 1.0, P * 10000 ** -0.5  # angles of the two channel pairs (head_dim 4)


def rotate(a, b, angle):
  return a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)


def rope_of(x, style, fraction=1.0):
  x = jnp.asarray(x, jnp.float32)[None, None, None, :]  # [B=1, T=1, H=1, D]
  return np.asarray(apply_rope(x, jnp.full((1, 1), P), style=style, fraction=fraction))[0, 0, 0]


def test_standard_pairs_channel_i_with_i_plus_half():
  y0, y2 = rotate(X[0], X[2], T0)
  y1, y3 = rotate(X[1], X[3], T1)
  np.testing.assert_allclose(rope_of(X, 'standard'), [y0, y1, y2, y3], rtol=1e-6)


def test_interleaved_pairs_neighbouring_channels():
  y0, y1 = rotate(X[0], X[1], T0)
  y2, y3 = rotate(X[2], X[3], T1)
  np.testing.assert_allclose(rope_of(X, 'interleaved'), [y0, y1, y2, y3], rtol=1e-6)


def test_fraction_rotates_only_the_leading_channels():
  x = X + [5.0, 6.0, 7.0, 8.0]
  np.testing.assert_allclose(rope_of(x, 'standard', fraction=0.5), list(rope_of(X, 'standard')) + x[4:], rtol=1e-6)


@pytest.mark.parametrize('style', ['standard', 'interleaved'])
def test_scores_depend_only_on_relative_position(style):
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))
  def score(m, n):
    return float(jnp.sum(apply_rope(q, jnp.full((1, 1), m), style=style) * apply_rope(k, jnp.full((1, 1), n), style=style)))
  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-2)


def test_bad_style_and_fraction_are_named():
  x = jnp.zeros((1, 1, 1, 6))
  with pytest.raises(ValueError, match='unknown rope style'):
    apply_rope(x, jnp.zeros((1, 1)), style='spiral')
  with pytest.raises(ValueError, match='rope fraction'):
    apply_rope(x, jnp.zeros((1, 1)), fraction=0.5)


def test_fraction_zero_is_nope_and_the_transformer_config_takes_it():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 2, 8)), jnp.float32)
  np.testing.assert_array_equal(apply_rope(x, jnp.asarray([[0, 5, 9]]), fraction=0.0), x)
  with pytest.raises(ValueError, match='rope fraction'):
    apply_rope(x, jnp.zeros((1, 3)), fraction=0.1)  # 0.8 of a channel: neither NoPE nor an even count
  # One layer without positions: the last token's logits depend on the earlier tokens as a set (with more
  # layers, the causal mask of the earlier tokens' own outputs still carries their order).
  tokens, swapped, positions = jnp.asarray([[3, 1, 4, 1, 5]]), jnp.asarray([[1, 3, 4, 1, 5]]), jnp.arange(5)[None]
  for fraction, same in ((0.0, True), (1.0, False)):
    call = jitted(tiny_model(num_layers=1, rope_fraction=fraction))
    difference = np.max(np.abs(call(tokens, positions)[0][0, -1] - call(swapped, positions)[0][0, -1]))
    assert (difference < 1e-5) == same, (fraction, difference)
