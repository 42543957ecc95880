"""The row schema: the one definition of a stored row, shared by slice files and the evaluation file.

A row is a numpy structured record ``(id, y, x)``: ``id`` an int64 or a fixed-width str (as wide as the
longest id the file holds, so equal rows always give equal bytes), ``y`` the int64 class index and ``x``
the float32 features of one row. Rows of an ``eval_set`` given without ids are ``(y, x)``. Files are
plain ``.npy`` bytes (`encode_rows`), read back with `decode_rows`; nothing is ever pickled.

Users: `shards.store` (slice files), `shards.ingest` (the out-of-core path, which builds the same bytes
in place with `npy_header`) and `sisa.evalfile` (``eval.npy``).
"""

from __future__ import annotations

import io

import numpy as np

INT_ID = np.dtype(np.int64)
LABEL = np.dtype(np.int64)
FEATURE = np.dtype(np.float32)
RISK = np.dtype(np.float64)  # a row's deletion prior: a fourth field, only under a deletion-aware placement


def id_width(ids) -> int:
    """The width of a str id field holding ``ids``: the longest id, at least 1."""
    return max(1, max((len(s) for s in np.asarray(ids).tolist()), default=1))


def id_dtype(id_kind: str, ids_or_width=1) -> np.dtype:
    """int64 for int ids; ``<U{w}`` for str ids, ``w`` given as a width or as the ids the field must hold."""
    if id_kind == "int":
        return INT_ID
    width = max(1, int(ids_or_width)) if isinstance(ids_or_width, (int, np.integer)) else id_width(ids_or_width)
    return np.dtype(f"<U{width}")


def row_fields(id_dt, feature_shape, risk: bool = False) -> list:
    """The ``(id, y, x)`` fields with the id field's dtype given (a spill file keeps its chunk's id dtype);
    ``(id, y, x, risk)`` with ``risk`` (slices of a deletion-aware placement, `shards.partition.Placement`).
    Without it the bytes are those of every uniform workdir."""
    fields = [("id", np.dtype(id_dt)), ("y", LABEL), ("x", FEATURE, tuple(feature_shape))]
    return fields + [("risk", RISK)] if risk else fields


def row_dtype(id_kind: str, ids_or_width, feature_shape, risk: bool = False) -> np.dtype:
    """The dtype of an ``(id, y, x)`` row of a slice or evaluation file (``(id, y, x, risk)`` with ``risk``)."""
    return np.dtype(row_fields(id_dtype(id_kind, ids_or_width), feature_shape, risk))


def has_risk(rows: np.ndarray) -> bool:
    return rows.dtype.names is not None and "risk" in rows.dtype.names


def unnamed_row_dtype(feature_shape) -> np.dtype:
    """The dtype of a ``(y, x)`` row: held-out rows given without ids, which cannot be named or erased."""
    return np.dtype([("y", LABEL), ("x", FEATURE, tuple(feature_shape))])


def make_rows(ids, y, X, id_kind: str | None, risk=None) -> np.ndarray:
    """Rows of ``(ids, y, X)``, or ``(y, X)`` when ``ids`` is None; the str id field as wide as the longest id.
    ``risk`` (one prior per row) adds the ``risk`` field."""
    X = np.asarray(X)
    if ids is None:
        dtype = unnamed_row_dtype(X.shape[1:])
    else:
        dtype = row_dtype(id_kind, ids, X.shape[1:], risk is not None)
    rows = np.zeros(len(y), dtype=dtype)
    if ids is not None:
        rows["id"] = ids
    rows["y"], rows["x"] = y, X
    if risk is not None:
        rows["risk"] = risk
    return rows


def compact(rows: np.ndarray, id_kind: str) -> np.ndarray:
    """``rows`` with the str id field narrowed to the longest id they hold, so equal rows give equal bytes."""
    if id_kind != "str":
        return rows
    dtype = row_dtype(id_kind, rows["id"], rows["x"].shape[1:], has_risk(rows))
    return rows.astype(dtype) if dtype != rows.dtype else rows


def encode_rows(rows: np.ndarray) -> bytes:
    """The ``.npy`` bytes of ``rows`` (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    return buf.getvalue()


def decode_rows(data: bytes) -> np.ndarray:
    """Rows from ``.npy`` bytes; refuses pickled content."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def npy_header(dtype: np.dtype, n: int) -> bytes:
    """The header `encode_rows` writes before ``n`` rows of ``dtype``: a caller that fills the rows in place
    after it (`shards.ingest`, which never holds two copies of a slice) gets the same bytes."""
    header = io.BytesIO()
    data = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}
    np.lib.format.write_array_header_1_0(header, data)
    return header.getvalue()
