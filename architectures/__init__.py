"""Model families. Importing this package registers every family by name."""
from architectures import transformer  # noqa: F401  (registers 'transformer')
from architectures.registry import create_model, families, get_family, model_config  # noqa: F401
