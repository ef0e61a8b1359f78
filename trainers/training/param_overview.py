"""A table of the model's parameters (path, shape, dtype, role, weight decay, count), printed at start."""
import jax
import numpy as np
from flax import nnx

from layers.param_roles import role_of
from trainers.training.optimizer import decay_mask


def parameter_overview(params: nnx.State) -> str:
  is_variable = lambda x: isinstance(x, nnx.Variable)
  variables = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)[0]
  decayed = jax.tree.leaves(decay_mask(params))
  rows = [(jax.tree_util.keystr(path, simple=True, separator='/'), variable.shape, variable.dtype.name,
           role_of(variable), 'yes' if wd else 'no', int(np.prod(variable.shape)))
          for (path, variable), wd in zip(variables, decayed)]
  width = max(len(r[0]) for r in rows)
  lines = [f'{"parameter":<{width}}  {"shape":<20} {"dtype":<9} {"role":<10} {"decay":<5} {"count":>12}']
  lines += [f'{name:<{width}}  {str(shape):<20} {dtype:<9} {role:<10} {wd:<5} {count:>12,}'
            for name, shape, dtype, role, wd, count in rows]
  total, with_decay = sum(r[5] for r in rows), sum(r[5] for r in rows if r[4] == 'yes')
  lines.append(f'{"total":<{width}}  {"":<20} {"":<9} {"":<10} {"":<5} {total:>12,}')
  lines.append(f'weight decay on {with_decay:,} of {total:,} parameters ({100 * with_decay / total:.1f}%), '
               f'{sum(decayed)} of {len(decayed)} arrays: projections and embeddings (trainers/training/optimizer.py)')
  return '\n'.join(lines)
