"""The exception tree (defined in `shards.errors` so that workers can raise it)."""

from shards.errors import (
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
