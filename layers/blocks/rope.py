"""Rotary position embedding (Su et al. 2021, RoFormer eq. 34).

Channel pairs (x1, x2) of each head are rotated by the angle `p * theta_i`, with
theta_i = base^(-2i / d_rot), i = 0 .. d_rot/2 - 1, and p the token's position:

    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).

`style='standard'` pairs channel i with i + d_rot/2 (GPT-NeoX, Llama, Gemma);
`style='interleaved'` pairs channels 2i and 2i + 1 (RoFormer, GPT-J, YOCO).
`fraction` < 1 rotates only the first `fraction * head_dim` channels and leaves
the rest as they are (RecurrentGemma rotates half); `fraction=0` rotates nothing:
no position information at all (NoPE, Kazemnejad et al. 2023), for ablations.
`frequencies='linspace'` spaces the exponents evenly from 0 to 1 inclusive,
theta_i = base^(-i / (d_rot/2 - 1)) (YOCO's reference code); the default
'standard' is base^(-2i / d_rot).
"""
import jax
import jax.numpy as jnp

STYLES = ('standard', 'interleaved')
FREQUENCIES = ('standard', 'linspace')


def rotary_dims(head_dim: int, fraction: float) -> int:
  d_rot = int(head_dim * fraction)
  if d_rot % 2 or d_rot < 0 or (fraction > 0 and d_rot == 0):
    raise ValueError(f'rope fraction {fraction} of head_dim {head_dim} gives {d_rot} channels; it must be even '
                     '(0: fraction 0, no rotation)')
  return d_rot


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10000.0,
               style: str = 'standard', fraction: float = 1.0, frequencies: str = 'standard') -> jax.Array:
  """x: [B, T, H, D], positions: [B, T] -> [B, T, H, D] (same dtype as x)."""
  if style not in STYLES:
    raise ValueError(f'unknown rope style {style!r}; known: {STYLES}')
  if frequencies not in FREQUENCIES:
    raise ValueError(f'unknown rope frequencies {frequencies!r}; known: {FREQUENCIES}')
  head_dim = x.shape[-1]
  d_rot = rotary_dims(head_dim, fraction)
  if d_rot == 0:
    return x
  if frequencies == 'standard':
    inv_freq = base ** (-jnp.arange(0, d_rot, 2, dtype=jnp.float32) / d_rot)  # [d_rot/2]
  else:
    inv_freq = base ** -jnp.linspace(0.0, 1.0, d_rot // 2, dtype=jnp.float32)  # [d_rot/2]
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, d_rot/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  rot, rest = x[..., :d_rot].astype(jnp.float32), x[..., d_rot:]
  if style == 'standard':
    x1, x2 = jnp.split(rot, 2, axis=-1)  # [B, T, H, d_rot/2] each
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  else:
    x1, x2 = rot[..., 0::2], rot[..., 1::2]
    rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
  return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)
