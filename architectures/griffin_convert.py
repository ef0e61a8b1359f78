"""Load recurrentgemma (JAX) parameters into our Griffin: released RecurrentGemma weights or any Griffin/Hawk.

    from architectures import griffin_convert
    params = ...  # recurrentgemma's Flax parameter tree, e.g. restored from its orbax checkpoint
    fields = griffin_convert.config_fields_from_reference(params, reference_window=2048)
    model = architectures.create_model(dict(name='griffin', **fields), nnx.Rngs(0))
    griffin_convert.load_reference_params(model, params)
    model = griffin_convert.model_from_reference(params, reference_window=2048)  # the three steps in one

Sampling from released weights, with the released SentencePiece tokenizer (tokenizer.model):
experiments/sample_recurrentgemma.py.

Mapping (recurrentgemma `blocks.<i>` -> our layer i, a layers/blocks/residual.ResidualBlock; layers sit in
groups of len(block_pattern), `groups.<g>.blocks.<j>`, the rest in `tail.0.blocks.<j>`):
  embedder.input_embedding               -> io.embed.table
  temporal_pre_norm / channel_pre_norm   -> mixer_norm / mlp_norm
  mlp_block.ffw_up.w [2, D, M], b [2,1,1,M] -> mlp.gate (index 0, under the GELU), mlp.up (index 1)
  mlp_block.ffw_down                     -> mlp.down
  recurrent_block.linear_{x,y} [D, lru]  -> mixer.linear_in [D, 2, lru] (index 0: x, 1: y)
  recurrent_block.linear_out             -> mixer.linear_out
  recurrent_block.conv_1d.{w,b}          -> mixer.conv.{kernel,bias} (w[-1] multiplies the current token in both)
  recurrent_block.rg_lru.a_param         -> mixer.lru.a_param
  recurrent_block.rg_lru.{input_gate, a_gate}.{w [H, i, j], b [H, j]} -> mixer.lru.gates [2, H, i, j], [2, H, j]
  attention_block.proj_{q,k,v} [D, N*H]  -> mixer.{query,key,value} [D, N, H]
  attention_block.proj_final [N*H, D]    -> mixer.out [N, H, D] (+ bias)
  final_norm                             -> final_norm

recurrentgemma's attention window w lets a query see w + 1 keys; our `window`
counts keys including the query, so it is w + 1. Only jax/flax/numpy here:
no recurrentgemma import is needed to convert.
"""
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from architectures.griffin import ATTENTION, RECURRENT, Griffin, GriffinConfig

_BLOCK = re.compile(r'^blocks\.(\d+)$')


def _unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
  return params['params'] if 'params' in params and 'embedder' not in params else params


def _reference_blocks(params: Mapping[str, Any]) -> list[Mapping[str, Any]]:
  found = {int(m.group(1)): value for key, value in params.items() if (m := _BLOCK.match(key))}
  if sorted(found) != list(range(len(found))):
    raise ValueError(f'reference blocks are not numbered 0..n-1: {sorted(found)}')
  return [found[i] for i in range(len(found))]


def _kind(block: Mapping[str, Any]) -> str:
  if 'recurrent_block' in block:
    return RECURRENT
  if 'attention_block' in block:
    return ATTENTION
  raise ValueError(f'reference block has neither recurrent_block nor attention_block: {sorted(block)}')


def _dense(p: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(kernel=np.asarray(p['kernel']))
  if 'bias' in p:
    out['bias'] = np.asarray(p['bias'])
  return out


def block_from_reference(block: Mapping[str, Any], num_heads: int) -> dict[str, Any]:
  """One recurrentgemma residual block -> our ResidualBlock's parameters (a nested dict)."""
  up_w, up_b = np.asarray(block['mlp_block']['ffw_up']['w']), np.asarray(block['mlp_block']['ffw_up']['b'])
  ours: dict[str, Any] = dict(
      mixer_norm=dict(scale=np.asarray(block['temporal_pre_norm']['scale'])),
      mlp_norm=dict(scale=np.asarray(block['channel_pre_norm']['scale'])),
      mlp=dict(gate=dict(kernel=up_w[0], bias=up_b[0].reshape(-1)),
               up=dict(kernel=up_w[1], bias=up_b[1].reshape(-1)),
               down=_dense(block['mlp_block']['ffw_down'])))
  if _kind(block) == RECURRENT:
    rec = block['recurrent_block']
    lru = rec['rg_lru']
    x, y = _dense(rec['linear_x']), _dense(rec['linear_y'])
    gates = [lru['input_gate'], lru['a_gate']]
    ours['mixer'] = dict(
        linear_in=dict(kernel=np.stack([x['kernel'], y['kernel']], axis=1), bias=np.stack([x['bias'], y['bias']])),
        linear_out=_dense(rec['linear_out']),
        conv=dict(kernel=np.asarray(rec['conv_1d']['w']), bias=np.asarray(rec['conv_1d']['b'])),
        lru=dict(a_param=np.asarray(lru['a_param']),
                 gates=dict(kernel=np.stack([np.asarray(g['w']) for g in gates]),
                            bias=np.stack([np.asarray(g['b']) for g in gates]))))
  else:
    att = block['attention_block']
    q = np.asarray(att['proj_q']['kernel'])
    dim, head_dim = q.shape[0], q.shape[1] // num_heads
    ours['mixer'] = dict(
        query=dict(kernel=q.reshape(dim, num_heads, head_dim)),
        key=dict(kernel=np.asarray(att['proj_k']['kernel']).reshape(dim, 1, -1)),
        value=dict(kernel=np.asarray(att['proj_v']['kernel']).reshape(dim, 1, -1)),
        out=dict(kernel=np.asarray(att['proj_final']['kernel']).reshape(num_heads, head_dim, -1),
                 bias=np.asarray(att['proj_final']['bias'])))
  return ours


def config_fields_from_reference(params: Mapping[str, Any], *, reference_window: int, num_heads: int | None = None,
                                 **overrides) -> dict[str, Any]:
  """Our `config.model` fields for a recurrentgemma parameter tree (shapes tell all but the window and heads).

  `reference_window` is recurrentgemma's `attention_window_size` (ours is one more).
  num_heads: read from the RG-LRU gates if there is a recurrent block, else required.
  Defaults match RecurrentGemma 2B/9B (scaled embeddings, soft cap 30); the
  paper's 7B models need scale_embeddings=False, logits_soft_cap=0.
  """
  params = _unwrap(params)
  blocks = _reference_blocks(params)
  kinds = ''.join(_kind(b) for b in blocks)
  vocab, dim = np.shape(params['embedder']['input_embedding'])
  recurrent = [b for b in blocks if _kind(b) == RECURRENT]
  if recurrent:
    gate_shape = np.shape(recurrent[0]['recurrent_block']['rg_lru']['input_gate']['w'])
    num_heads = num_heads or gate_shape[0]
    lru_width = gate_shape[0] * gate_shape[1]
  elif num_heads is None:
    raise ValueError('no recurrent block to read num_heads from: pass num_heads')
  else:
    lru_width = 0
  for period in range(1, len(kinds) + 1):  # the shortest pattern that, cycled, gives every block's kind
    if (kinds[:period] * (len(kinds) // period + 1))[:len(kinds)] == kinds:
      break
  fields = dict(vocab_size=int(vocab), dim=int(dim), num_layers=len(blocks), num_heads=int(num_heads),
                lru_width=int(lru_width), mlp_dim=int(np.shape(blocks[0]['mlp_block']['ffw_up']['w'])[2]),
                block_pattern=kinds[:period], window=reference_window + 1, tie_embeddings=True)
  fields.update(overrides)
  return fields


def params_from_reference(params: Mapping[str, Any], config: GriffinConfig) -> dict[str, Any]:
  """recurrentgemma parameters -> a pure dict shaped like nnx.state(Griffin(config), nnx.Param)."""
  params = _unwrap(params)
  blocks = _reference_blocks(params)
  kinds = ''.join(_kind(b) for b in blocks)
  if kinds != config.block_types:
    raise ValueError(f'reference blocks are {kinds!r} but config.model gives {config.block_types!r} '
                     f'(num_layers={config.num_layers}, block_pattern={config.block_pattern!r})')
  if not config.tie_embeddings:
    raise ValueError('config.model.tie_embeddings=False: recurrentgemma ties the logits to the embedding')
  ours = [block_from_reference(b, config.num_heads) for b in blocks]
  period = len(config.block_pattern)
  num_groups, tail = divmod(config.num_layers, period)
  state: dict[str, Any] = dict(io=dict(embed=dict(table=np.asarray(params['embedder']['input_embedding']))),
                               final_norm=dict(scale=np.asarray(params['final_norm']['scale'])))
  if num_groups and config.scan_layers:
    stacked = {j: jax.tree.map(lambda *xs: np.stack(xs), *[ours[g * period + j] for g in range(num_groups)])
               for j in range(period)}
    state['groups'] = dict(blocks=stacked)
  elif num_groups:
    state['groups'] = {g: dict(blocks={j: ours[g * period + j] for j in range(period)}) for g in range(num_groups)}
  if tail:
    state['tail'] = {0: dict(blocks={j: ours[num_groups * period + j] for j in range(tail)})}
  return state


def load_reference_params(model: Griffin, params: Mapping[str, Any]) -> None:
  """Overwrites `model`'s parameters with recurrentgemma's (shapes checked, cast to the param dtype)."""
  state = nnx.state(model, nnx.Param)
  target = nnx.to_pure_dict(state)
  converted = params_from_reference(params, model.config)
  paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]}
  found = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(converted)[0]}
  if paths != found:
    raise ValueError(f'parameter trees differ: missing {sorted(paths - found)[:5]}, extra {sorted(found - paths)[:5]}')

  def cast(old, new):
    if np.shape(old) != np.shape(new):
      raise ValueError(f'shape {np.shape(new)} from the reference, {np.shape(old)} in the model')
    return jax.numpy.asarray(new, old.dtype)

  nnx.replace_by_pure_dict(state, jax.tree.map(cast, target, converted))
  nnx.update(model, state)


def model_from_reference(params: Mapping[str, Any], *, reference_window: int, **overrides) -> Griffin:
  """Our Griffin holding recurrentgemma's parameters: `config_fields_from_reference` (with `overrides`, e.g.
  dtype, param_dtype), built abstractly (no initialiser runs) and filled by `load_reference_params`."""
  config = GriffinConfig.from_mapping(config_fields_from_reference(params, reference_window=reference_window,
                                                                   **overrides))
  model = nnx.eval_shape(lambda: Griffin(config, rngs=nnx.Rngs(0)))
  load_reference_params(model, params)
  return model
