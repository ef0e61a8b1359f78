"""AdamW (Loshchilov & Hutter 2019) with linear warmup, cosine decay and global-norm clipping.

Weight decay goes by parameter role (layers/param_roles.py), never by shape:
projection and embedding matrices are decayed; norms, biases, recurrence and
decay parameters, LoRA mixing matrices, state ids and learned queries are
not. The roles are declared where each parameter is created, so the mask is
the same with `scan_layers` (stacked layers) as without. docs/architectures.md
("Weight decay") gives the rule per family and the reference it follows.
"""
import jax
import optax
from flax import nnx
from ml_collections import ConfigDict

from layers import param_roles

DECAYED_ROLES = frozenset({param_roles.PROJECTION, param_roles.EMBEDDING})


def learning_rate_schedule(opt: ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = min(opt.warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=opt.learning_rate * opt.end_lr_fraction)


def decay_mask(params: nnx.State) -> nnx.State:
  """True for each parameter AdamW decays (by its role); refuses a parameter created without a role."""
  def decayed(path: tuple, variable: nnx.Variable) -> bool:
    role = param_roles.role_of(variable)
    if role is None:
      name = '/'.join(str(getattr(k, 'key', k)) for k in path)
      raise ValueError(f'parameter {name} has no role: create it with layers.param_roles.param(value, role)')
    return role in DECAYED_ROLES
  return jax.tree_util.tree_map_with_path(decayed, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(config: ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  opt = config.optimizer
  schedule = learning_rate_schedule(opt, config.total_steps)
  chain = []
  if opt.clip_norm:
    chain.append(optax.clip_by_global_norm(opt.clip_norm))
  chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=decay_mask))
  return optax.chain(*chain), schedule
