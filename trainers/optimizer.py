"""AdamW (Loshchilov & Hutter 2019) with linear warmup, cosine decay and global-norm clipping.

Weight decay applies to matrices only (ndim >= 2), not to norm scales or biases.
"""
import jax
import optax
from ml_collections import ConfigDict


def learning_rate_schedule(opt: ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = min(opt.warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=opt.learning_rate * opt.end_lr_fraction)


def make_optimizer(config: ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  opt = config.optimizer
  schedule = learning_rate_schedule(opt, config.total_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  chain = []
  if opt.clip_norm:
    chain.append(optax.clip_by_global_norm(opt.clip_norm))
  chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=decay_mask))
  return optax.chain(*chain), schedule
