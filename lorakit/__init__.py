"""lorakit: train LoRAs per Stable Diffusion checkpoint on a studio's curated, tagged game assets.

The Python API mirrors the command line: every ``lorakit X Y`` command is one function here.
"""

from .config import Config, load_config, resolve_weights
from .errors import ConfigError, DatasetError, InvalidIdError, LorakitError, RecordError, RecordNotFoundError
from .ids import check_id, new_ulid
from .store import Store
from .validate import validate_records
from .workspace import Workspace, open_workspace

__all__ = [
    "Config", "ConfigError", "DatasetError", "InvalidIdError", "LorakitError", "RecordError", "RecordNotFoundError",
    "Store", "Workspace", "check_id", "load_config", "new_ulid", "open_workspace", "resolve_weights",
    "validate_records",
]
