"""The ends of a model: byte/token embedding and logits, or continuous features and predictions."""
from layers.blocks.series_io import SeriesIO
from layers.blocks.token_io import TokenIO


def make_io(vocab_size: int, dim: int, *, input_features: int = 0, **token_options) -> TokenIO | SeriesIO:
  """TokenIO for token models; SeriesIO (forecasting F features) when input_features > 0.

  token_options are TokenIO's keyword arguments; SeriesIO takes dtype, param_dtype and rngs from them.
  """
  if input_features:
    return SeriesIO(input_features, dim, dtype=token_options['dtype'], param_dtype=token_options['param_dtype'],
                    rngs=token_options['rngs'])
  return TokenIO(vocab_size, dim, **token_options)
