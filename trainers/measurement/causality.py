"""Causality and document isolation of a model's forward pass, measured with random weights.

A language model's logit at position t may depend only on the tokens at positions <= t of the
same document (positions restart at 0 at each document of a packed row). Two probes, each a
pair of forward passes that differ only in some input tokens:

  future    tokens at row index >= P replaced: no logit before P may move;
  document  a row packs documents A | B; A's tokens replaced: no logit of B may move.

`leak` is the largest change of a logit that must not move, `effect` the largest change of one
that may (showing the replaced tokens matter). The weights are the model's plus Gaussian noise:
zero-initialised projections (LoRA A matrices, output gates) would hide a leak behind a zero.
The forward is the training path's: `model(tokens, positions, cache, capped=False)` in one
jit, with the model's kernels (`attention_impl`, Pallas or XLA recurrences) and dtype; streaming
families train with a carried cache, so `with_cache` probes that path too.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from architectures.base import SequenceModel


def with_random_weights(model: SequenceModel, seed: int = 0, scale: float = 0.1) -> SequenceModel:
  """A copy of `model` whose every parameter has N(0, scale^2) noise added."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy), rest)


def forward(model: SequenceModel, *, with_cache: bool = False):
  """(tokens, positions) [B, T] -> float32 logits [B, T, V], the training forward, jitted."""
  graphdef, state = nnx.split(model)

  def logits(state, tokens, positions):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(tokens.shape[0], tokens.shape[1], jnp.dtype(model.config.dtype)) if with_cache else None
    return model(tokens, positions, cache, capped=False)[0].astype(jnp.float32)

  jitted = jax.jit(logits)
  return lambda tokens, positions: jitted(state, tokens, positions)


def _replaced(tokens: np.ndarray, where: np.ndarray, vocab: int, seed: int) -> np.ndarray:
  """`tokens` with every token where `where` is True replaced by a different one."""
  shift = np.random.default_rng(seed).integers(1, vocab, size=tokens.shape)
  return np.where(where, (tokens + shift) % vocab, tokens)


def probe(call, tokens: np.ndarray, positions: np.ndarray, replace: np.ndarray, frozen: np.ndarray,
          vocab: int, seed: int = 1) -> dict[str, float]:
  """Replaces the tokens where `replace` [B, T]; `frozen` [B, T] marks the logits that must not move."""
  before = np.asarray(call(jnp.asarray(tokens), jnp.asarray(positions)))
  after = np.asarray(call(jnp.asarray(_replaced(tokens, replace, vocab, seed)), jnp.asarray(positions)))
  change = np.max(np.abs(after - before), axis=-1)  # [B, T]
  return dict(leak=float(np.max(change, where=frozen, initial=0.0)),
              effect=float(np.max(change, where=~frozen, initial=0.0)))


def check(model: SequenceModel, seq_len: int, *, with_cache: bool = False, seed: int = 0) -> dict[str, dict]:
  """Both probes on two rows of `seq_len` tokens: row 0 one document, row 1 two (A: the first ~45%).
  The future probe cuts at P ~ 0.53 x seq_len, inside both rows' last document."""
  vocab = model.io.vocab_size
  split, cut = int(0.45 * seq_len), int(0.53 * seq_len) | 1  # odd: off every chunk and block border
  tokens = np.random.default_rng(seed).integers(0, vocab, size=(2, seq_len)).astype(np.int32)
  positions = np.stack([np.arange(seq_len), np.concatenate([np.arange(split), np.arange(seq_len - split)])])
  positions = positions.astype(np.int32)
  index = np.broadcast_to(np.arange(seq_len), (2, seq_len))
  call = forward(model, with_cache=with_cache)
  future = probe(call, tokens, positions, replace=index >= cut, frozen=index < cut, vocab=vocab)
  in_a = (np.arange(2)[:, None] == 1) & (index < split)
  in_b = (np.arange(2)[:, None] == 1) & (index >= split)
  document = probe(call, tokens, positions, replace=in_a, frozen=in_b, vocab=vocab)
  return dict(future=dict(future, cut=cut), document=dict(document, split=split))
