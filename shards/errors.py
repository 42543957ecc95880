"""The one exception tree of sisa.

It lives in the lowest layer so that workers can raise it; `sisa.errors` re-exports it. Every error
pickles across Ray workers with its structured detail (``shard``, ``path``, ``ids`` ...).

`NotFittedError` is also scikit-learn's ``sklearn.exceptions.NotFittedError`` (so ``except`` clauses and
``check_is_fitted`` written for sklearn estimators catch it). Importing sklearn takes about a second and pulls
scipy and pandas, so that class is defined on first use (PEP 562): importing this module stays light.
"""

from __future__ import annotations

import threading


class SisaError(Exception):
    """Base class of every error sisa raises on purpose."""

    def __init__(self, message: str, **detail):
        super().__init__(message)
        self.message = message
        self.detail = detail
        for key, value in detail.items():
            setattr(self, key, value)

    def add_detail(self, **detail) -> SisaError:
        """Add detail (e.g. which shard) without overwriting what the raiser set."""
        for key, value in detail.items():
            if key not in self.detail:
                self.detail[key] = value
                setattr(self, key, value)
        return self

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.detail))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls, message, detail):
    return cls(message, **detail)


class ConfigError(SisaError):
    """The config is invalid; ``problems`` lists every problem found."""


class DataError(SisaError):
    """Training or prediction data is unusable (shape, NaN, labels, ids)."""


class UnknownIdsError(DataError):
    """Ids that the ensemble never held; ``ids`` holds (up to a few of) them."""


class WorkdirError(SisaError):
    """The workdir is missing, incompatible, locked or outside the allowed root."""


class IntegrityError(SisaError):
    """A checkpoint or store file does not match its recorded digest; ``path`` names it."""


class ShardTrainingError(SisaError):
    """Training a shard failed; ``shard`` and ``stage`` say where."""


class RetrainingError(SisaError):
    """No shard can answer because a deletion is retraining every active shard; predictions resume when it
    finishes. ``request_id`` names the deletion, ``remaining_seconds`` estimates how long it still needs
    (None when unknown), ``waited`` is how long the caller waited, ``running`` whether a process holds the
    workdir (False: the deletion was interrupted and finishes at the next ``SisaEnsemble.open``)."""


_not_fitted_lock = threading.Lock()


def _define_not_fitted_error() -> type[SisaError]:
    from sklearn.exceptions import NotFittedError as SklearnNotFittedError  # heavy: only on first use

    class NotFittedError(SisaError, SklearnNotFittedError):
        """The ensemble was used before `fit` (or `open` of a trained workdir). Also sklearn's
        ``NotFittedError`` (a ``ValueError`` and an ``AttributeError``)."""

    NotFittedError.__module__, NotFittedError.__qualname__ = __name__, "NotFittedError"  # pickles by name
    return NotFittedError


def __getattr__(name: str):
    if name == "NotFittedError":
        with _not_fitted_lock:  # one class, even when two threads ask at once
            cls = globals().get(name)
            if cls is None:
                cls = globals()[name] = _define_not_fitted_error()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
