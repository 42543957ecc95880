"""The exception tree (defined in `shards.errors` so that workers can raise it).

`NotFittedError` (also sklearn's) resolves on first use, as in `shards.errors`: importing this module
does not import scikit-learn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import shards.errors
from shards.errors import (
    ConfigError,
    DataError,
    IntegrityError,
    RetrainingError,
    ShardTrainingError,
    SisaError,
    UnknownIdsError,
    WorkdirError,
)

if TYPE_CHECKING:
    from shards.errors import NotFittedError

__all__ = [
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


def __getattr__(name: str):
    if name == "NotFittedError":
        return shards.errors.NotFittedError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
