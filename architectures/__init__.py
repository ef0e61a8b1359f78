"""Model families. Importing this package registers every family by name."""
from architectures import transformer  # noqa: F401  (registers 'transformer')
from architectures import aaren  # noqa: F401  (registers 'aaren')
from architectures import block_recurrent  # noqa: F401  (registers 'block_recurrent')
from architectures import griffin  # noqa: F401  (registers 'griffin': Griffin and Hawk)
from architectures import yoco  # noqa: F401  (registers 'yoco')
from architectures import goldfinch  # noqa: F401  (registers 'goldfinch': GoldFinch and Finch)
from architectures import hybrid  # noqa: F401  (registers 'hybrid': any pattern of the mixers above)
from architectures.registry import create_model, families, get_family, model_config  # noqa: F401
