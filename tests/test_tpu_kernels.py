"""TPU kernels: splash attention and the Pallas linear scan equal their XLA references
(Pallas interpret mode on CPU, sharded over 8 CPU devices as on a TPU mesh), `auto`
picks them when compiling for a TPU topology (their Mosaic calls are in the compiled
train step of tiny Griffin and sliding-window configs) and falls back where they
do not apply (decoding with a cache); bad choices are clear errors."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.documents import locate
from layers.kernels import attention_ops
from layers.mixers import linear_recurrence, rg_lru
from layers.mixers.linear_recurrence import linear_recurrence as recurrence
from tests.helpers import MESH, family_tiny_config, packed_positions, sharded
from trainers.experiment import Experiment
from trainers.measurement.tpu_compile import compile_decode_step, compile_train_step, topology_devices

TOPOLOGY = 'v5e:2x4'


@pytest.mark.parametrize('window, kv_heads', [(None, 2), (17, 1)])  # global GQA; sliding-window MQA
def test_splash_equals_xla_over_packed_rows(window, kv_heads):
  batch, length, heads, head_dim = 4, 128, 4, 16
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), jnp.float32) for _ in range(2))
  positions = packed_positions([[50, 78], [128], [30, 30, 40], [90]], pad_to=length)  # starts mid-row; padding
  segments = locate(positions)[0]
  index, documents = segments.index, segments.document
  real = (positions >= 0)[..., None, None]  # padded queries' outputs are never read

  def loss(impl):
    return lambda q, k, v: jnp.sum(jnp.where(real, attention_ops.self_attention(
        q, k, v, index, documents, window, head_dim ** -0.5, impl), 0.0) * jnp.cos(q))

  reference = jax.jit(jax.value_and_grad(loss('xla'), argnums=(0, 1, 2)))(q, k, v)
  for splash in (jax.jit(jax.value_and_grad(loss('splash'), argnums=(0, 1, 2)))(q, k, v),
                 sharded(jax.value_and_grad(loss('splash'), argnums=(0, 1, 2)), q, k, v)):
    for got, want in zip(jax.tree.leaves(splash), jax.tree.leaves(reference)):
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('with_h0', [False, True])
def test_pallas_scan_equals_sequential(with_h0):
  rng = np.random.default_rng(1)
  shape = (4, 300, 3, 8)  # T = 300: three time blocks of 128 after padding; channels flattened to 24
  a = jnp.asarray(rng.uniform(0.5, 1.0, size=shape) * (rng.random(shape) > 0.05), jnp.float32)  # some resets
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  h0 = jnp.asarray(rng.normal(size=(shape[0], *shape[2:])), jnp.float32) if with_h0 else None

  def loss(impl):
    def fn(a, x, h0):
      h, last = recurrence(a, x, h0, impl=impl)
      return jnp.sum(h * jnp.cos(x)) + jnp.sum(last * jnp.sin(last)), (h, last)
    return jax.value_and_grad(fn, argnums=(0, 1) if h0 is None else (0, 1, 2), has_aux=True)

  reference = loss('sequential')(a, x, h0)
  for pallas in (jax.jit(loss('pallas'))(a, x, h0), sharded(loss('pallas'), a, x, h0)):
    for got, want in zip(jax.tree.leaves(pallas), jax.tree.leaves(reference)):
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_auto_picks_the_kernels_only_when_compiling_for_tpu():
  assert attention_ops.resolve_impl('auto', jnp.bfloat16, 64, 128) == 'xla'
  assert linear_recurrence.resolve_impl('auto') == 'sequential'
  tpu_mesh = jax.make_mesh((8,), ('data',), devices=topology_devices(TOPOLOGY),
                           axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(tpu_mesh):  # this host's backend is still CPU: the mesh says TPU
    assert attention_ops.resolve_impl('auto', jnp.bfloat16, 64, 128) == 'splash'
    assert attention_ops.resolve_impl('auto', jnp.bfloat16, 64, 96) == 'xla'    # T not a multiple of 128
    assert attention_ops.resolve_impl('auto', jnp.bfloat16, 64, None) == 'xla'  # cache / cross-attention
    assert linear_recurrence.resolve_impl('auto') == 'pallas'
    assert rg_lru.resolve_impl('auto') == 'pallas'
    with pytest.raises(ValueError, match="'fused' is a Pallas Triton kernel for GPUs"):
      rg_lru.resolve_impl('fused')


def test_clear_errors():
  with pytest.raises(ValueError, match='unknown attention impl'):
    attention_ops.resolve_impl('flash', jnp.bfloat16, 64, 128)
  with pytest.raises(ValueError, match='sequence length 96 is not a multiple of 128'):
    attention_ops.resolve_impl('splash', jnp.bfloat16, 64, 96)
  with pytest.raises(ValueError, match='KV cache'):
    attention_ops.resolve_impl('splash', jnp.bfloat16, 64, None)
  with pytest.raises(ValueError, match='unknown linear recurrence impl'):
    recurrence(jnp.ones((1, 4, 2)), jnp.ones((1, 4, 2)), impl='pallas_gpu')


def mosaic_kernels(compiled) -> list[str]:
  """Names of the Mosaic (Pallas TPU) custom calls in a compiled TPU program."""
  return re.findall(r'%([\w.\-]+) = [^\n]*custom_call_target="tpu_custom_call"', compiled.as_text())


# sliding: `auto` picks splash; griffin: `auto` picks the scan, and an explicit 'splash' decodes (with
# its cache) by the XLA path with no error.
@pytest.mark.parametrize('name, attention, kernels', [('sliding', 'auto', ('splash_mha',)),
                                                      ('griffin', 'splash', ('splash_mha', 'linear_scan'))])
def test_tpu_compile_selects_the_kernels(name, attention, kernels, data_dir):
  config = family_tiny_config(name, data_dir, MESH)
  config.model.update(dtype='bfloat16', attention_impl=attention)
  config.seq_len = 128  # a multiple of the splash block
  exp = Experiment.build(config, topology_devices(TOPOLOGY))
  with exp.activate():
    train = mosaic_kernels(compile_train_step(exp, config.batch_size, config.seq_len))
    decode = mosaic_kernels(compile_decode_step(exp, config.batch_size, config.seq_len))
  for kernel in kernels:
    assert any(k.startswith(kernel) for k in train), (kernel, train)
  assert any('dkv' in k for k in train)  # the backward kernels too
  assert decode == []  # one token against a cache: the XLA path
