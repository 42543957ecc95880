"""sisa: exact machine unlearning with sharded, isolated, sliced and aggregated ensembles.

The names below resolve on first use (PEP 562), so ``import sisa`` stays light: torch, Lightning, Ray and
MLflow load only when an ensemble is built, not when a caller imports `sisa.errors` or `sisa.costmodel`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sisa.config import SisaConfig, load_config
    from sisa.ensemble import SisaEnsemble
    from sisa.errors import (
        ConfigError,
        DataError,
        IntegrityError,
        NotFittedError,
        RetrainingError,
        ShardTrainingError,
        SisaError,
        UnknownIdsError,
        WorkdirError,
    )
    from sisa.ops.receipts import DeletionPlan, Receipt

_ERRORS = (
    "ConfigError",
    "DataError",
    "IntegrityError",
    "NotFittedError",
    "RetrainingError",
    "ShardTrainingError",
    "SisaError",
    "UnknownIdsError",
    "WorkdirError",
)
_LAZY = {
    "SisaEnsemble": "sisa.ensemble",
    "SisaConfig": "sisa.config",
    "load_config": "sisa.config",
    "Receipt": "sisa.ops.receipts",
    "DeletionPlan": "sisa.ops.receipts",
    **dict.fromkeys(_ERRORS, "sisa.errors"),
}

__all__ = [
    "SisaEnsemble",
    "SisaConfig",
    "load_config",
    "Receipt",
    "DeletionPlan",
    "ConfigError",
    "DataError",
    "IntegrityError",
    "NotFittedError",
    "RetrainingError",
    "ShardTrainingError",
    "SisaError",
    "UnknownIdsError",
    "WorkdirError",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sisa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once; later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
