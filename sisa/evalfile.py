"""The evaluation file ``WORKDIR/eval.npy``: the held-out rows behind the accuracy figures.

It is personal data like the training rows, so it can be erased the same way. Format: a structured
array with the fields of a slice file, ``(id, y, x)`` (the row schema, `shards.schema`), the str id field narrowed to
the longest id it holds, so that erasing rows gives the same bytes as never storing them. A file
without an ``id`` field holds rows that cannot be named: an ``eval_set=(X, y)`` given without ids, or a
workdir written by an older sisa. ``delete`` cannot erase those rows; fit again with ids to change that.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from shards.schema import compact, encode_rows, make_rows
from shards.storage import write_atomic, zero_and_remove

NAME = "eval.npy"


def encode(X: np.ndarray, y: np.ndarray, ids: np.ndarray | None, kind: str | None) -> bytes:
    """The file's bytes; ``ids=None`` (an ``eval_set=(X, y)``) stores rows that cannot be named, and warns."""
    if ids is None:
        if len(y):
            warnings.warn(
                f"eval_set has no ids: its {len(y)} rows are stored in the workdir's {NAME} for the accuracy "
                "figures, but delete() cannot name them, so they cannot be erased; pass "
                "eval_set=(X_test, y_test, ids_test) to make them erasable",
                UserWarning,
                stacklevel=5,
            )
    return encode_rows(make_rows(ids, y, X, kind))


def read(workdir_path: Path) -> np.ndarray | None:
    path = Path(workdir_path) / NAME
    return np.load(path, allow_pickle=False) if path.exists() else None


def has_ids(rows: np.ndarray | None) -> bool:
    return rows is not None and rows.dtype.names is not None and "id" in rows.dtype.names


def find(workdir_path: Path, ids: list) -> set:
    """Which of ``ids`` (canonical Python ints or strs) are rows of the evaluation file."""
    rows = read(workdir_path)
    if not has_ids(rows) or not ids:
        return set()
    return set(ids) & set(rows["id"].tolist())


def erase(workdir, hashed: set, kind: str) -> int:
    """Rewrite the evaluation file without the rows whose keyed id hash is in ``hashed`` (atomically: temp
    file, fsync, rename). Idempotent; returns how many rows it removed this time."""
    rows = read(workdir.path)
    if not has_ids(rows) or len(rows) == 0:
        return 0
    drop = np.array([h in hashed for h in workdir.hash_ids(rows["id"].tolist())], dtype=bool)
    if not drop.any():
        return 0
    replace_zeroing(workdir.path / NAME, encode_rows(compact(rows[~drop], kind)))
    return int(drop.sum())


OLD = ".eval-old.npy"  # the superseded evaluation file, kept by a hard link until it is zeroed


def replace_zeroing(path, data: bytes) -> None:
    """Replace ``path`` atomically and zero the old file's bytes: a rename alone would leave the erased rows
    in free disk blocks. The old file keeps a second name (`OLD`) until it is zeroed; after a crash
    `discard_old` finishes the job (or, if the rename never happened, just drops the extra name)."""
    old = path.parent / OLD
    discard_old(path.parent)
    os.link(path, old)
    write_atomic(path, data)
    discard_old(path.parent)


def discard_old(workdir_path) -> None:
    """Zero and remove a superseded evaluation file, unless it is still the live one (then only unlink)."""
    old, live = Path(workdir_path) / OLD, Path(workdir_path) / NAME
    if not old.exists():
        return
    if live.exists() and os.path.samefile(old, live):
        old.unlink()
    else:
        zero_and_remove(old)
