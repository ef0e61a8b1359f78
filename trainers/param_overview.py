"""A table of the model's parameters (path, shape, dtype, count), printed at start."""
import jax
import numpy as np
from flax import nnx


def parameter_overview(params: nnx.State) -> str:
  rows = [(jax.tree_util.keystr(path, simple=True, separator='/').removesuffix('/value'), leaf.shape, leaf.dtype.name,
           int(np.prod(leaf.shape)))
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
  width = max(len(r[0]) for r in rows)
  lines = [f'{"parameter":<{width}}  {"shape":<20} {"dtype":<9} {"count":>12}']
  lines += [f'{name:<{width}}  {str(shape):<20} {dtype:<9} {count:>12,}' for name, shape, dtype, count in rows]
  lines.append(f'{"total":<{width}}  {"":<20} {"":<9} {sum(r[3] for r in rows):>12,}')
  return '\n'.join(lines)
