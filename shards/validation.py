"""The rules training data must meet, shared by the in-memory path (`sisa.data`) and the out-of-core
Parquet path (`shards.ingest`), so that the same bad data gives the same DataError with the same message
whichever path reads it.

- columns: the id and label columns exist; every other column is a feature and is numeric (the first
  non-numeric column is named); no column has missing values (the column and first row are named);
- features: numeric, shape ``(n_rows, ...)``, finite (the first bad row is named);
- labels: one integer class index 0..K-1 per row (the first fractional or negative row is named);
- ids: canonical (`shards.ids`, the one canonicalisation), one per row, unique;
- size: at least ``shards x slices`` training rows.

Functions that check a piece of the data take ``first_row``: the row number of its first row in the whole
dataset, so a check of one chunk names the same row as a check of all rows at once.
"""

from __future__ import annotations

import numpy as np

from shards.errors import DataError
from shards.ids import canonical_ids

LABEL_HINT = "encode them as integer class indices 0..K-1, e.g. with sklearn's LabelEncoder"
_MISSING_HINT = {
    "id": "every row needs an id",
    "label": "every row needs a label: drop those rows",
    "feature": "impute or drop them",
}


def _at(where: str | None) -> str:
    return f"{where}: " if where else ""


# -- columns of a table (a pyarrow Table or Parquet schema) ----------------------------------------
def check_columns(names: list[str], id_column: str, label_column: str, where: str) -> list[str]:
    """The feature columns: every column but the id and label columns, which must exist."""
    for col, setting in ((label_column, "data.label_column"), (id_column, "data.id_column")):
        if col not in names:
            hint = " (fit needs an id column so rows can be deleted by id)" if col == id_column else ""
            raise DataError(f"{where} has no column {col!r} (columns: {list(names)[:10]}); set {setting}{hint}")
    return feature_columns(names, (id_column, label_column), where)


def feature_columns(names: list[str], drop: tuple, where: str) -> list[str]:
    """``names`` without the ``drop`` columns; at least one must be left."""
    feats = [c for c in names if c not in drop]
    if not feats:
        besides = f" besides {' and '.join(map(repr, drop))}" if drop else ""
        raise DataError(f"{where} has no feature columns{besides}")
    return feats


def check_id_type(schema, id_column: str) -> None:
    """An id column holds integers or text (strings, or binary decoded as UTF-8)."""
    import pyarrow as pa

    t = schema.field(id_column).type
    if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t)):  # fmt: skip
        raise DataError(f"id column {id_column!r} has type {t}; ids must be integers or strings")


def feature_dtypes(schema, names: list[str], where: str) -> list[np.dtype]:
    """The numpy dtype of each feature column; the first non-numeric column is named in the error."""
    import pyarrow as pa

    out = []
    for c in names:
        t = schema.field(c).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            kind = "string" if pa.types.is_string(t) or pa.types.is_large_string(t) else t
            raise DataError(
                f"{where}: feature column {c!r} has type {kind}; every column other than the id and label columns "
                "is a feature and features must be numeric: encode it (e.g. one-hot or ordinal) or drop it "
                "before fitting or predicting"
            )
        out.append(np.dtype(t.to_pandas_dtype()))
    return out


def check_missing(column, role: str, name: str, first_row: int = 0, where: str | None = None) -> None:
    """No missing value in a pyarrow column (``role``: id, label or feature); names the first such row."""
    if not column.null_count:
        return
    row = first_row + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
    raise DataError(
        f"{_at(where)}{role} column {name!r} has missing values (first at row {row}); {_MISSING_HINT[role]}",
        rows=[row],
    )


# -- arrays ----------------------------------------------------------------------------------------
def check_finite(X: np.ndarray, first_row: int = 0) -> None:
    """Every feature of every row is finite; names the first row that is not."""
    if np.isfinite(X).all():
        return
    bad = np.flatnonzero(~np.isfinite(X).reshape(len(X), -1).all(1)) + first_row
    raise DataError(
        f"features contain NaN or inf (first at row {bad[0]}); impute or drop those rows", rows=bad[:10].tolist()
    )


def check_features(X, input_shape=None, first_row: int = 0) -> np.ndarray:
    """Numeric features of shape (n_rows, ...) (``input_shape`` per row when given), finite, as float32."""
    X = np.asarray(X)
    if X.dtype.kind not in "fiub":
        raise DataError(f"features must be numeric, got dtype {X.dtype}")
    if X.ndim < 2:
        raise DataError(f"features must have shape (n_rows, ...), got {X.shape}; reshape with X.reshape(len(X), -1)")
    X = X.astype(np.float32)
    if input_shape is not None and tuple(X.shape[1:]) != tuple(input_shape):
        raise DataError(
            f"features have shape {X.shape[1:]} per row but the ensemble was trained on {tuple(input_shape)}"
        )
    check_finite(X, first_row)
    return X


def check_labels(y, n_rows: int, what: str = "labels", first_row: int = 0) -> np.ndarray:
    """Integer class indices 0..K-1 as int64, one per row; anything else is a DataError saying what to do."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n_rows:
        raise DataError(f"{what} must be a 1-d array with one label per row: got shape {y.shape} for {n_rows} rows")
    if y.dtype.kind not in "iuf":
        raise DataError(f"{what} have dtype {y.dtype}; {LABEL_HINT}")
    if y.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = np.flatnonzero(~np.isfinite(y) | (np.mod(y, 1) != 0))
        if len(bad):
            raise DataError(
                f"{what} hold fractional or non-finite values (first at row {first_row + bad[0]}); {LABEL_HINT}",
                rows=(bad[:10] + first_row).tolist(),
            )
    neg = np.flatnonzero(y < 0) if y.dtype.kind != "u" else ()
    if len(neg):
        i = int(neg[0])
        raise DataError(
            f"{what} hold a negative value ({int(y[i])} at row {first_row + i}); {LABEL_HINT}", rows=[first_row + i]
        )
    return y.astype(np.int64)


# -- ids -------------------------------------------------------------------------------------------
def check_ids(ids, n_rows: int) -> tuple[np.ndarray, str]:
    """Canonical ids (`shards.ids.canonical_ids`), one per row, and their kind; not yet checked unique."""
    ids, kind = canonical_ids(ids)
    if len(ids) != n_rows:
        raise DataError(f"ids has {len(ids)} entries but there are {n_rows} rows; give one id per row")
    return ids, kind


def check_id_kind(kind: str, expected: str | None, first_row: int) -> str:
    """Every chunk of one dataset holds the same kind of id."""
    if expected is not None and kind != expected:
        raise DataError(f"ids change type from {expected} to {kind} at row {first_row}; use one id type")
    return kind


def repeated_ids(ids: np.ndarray) -> tuple[int, list]:
    """How many distinct ids occur more than once in ``ids``, and the smallest five of them."""
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) == len(ids):
        return 0, []
    rep = uniq[counts > 1]
    return len(rep), rep[:5].tolist()


def check_unique(*found: tuple[int, list]) -> None:
    """Raise if ids repeat: ``found`` are `repeated_ids` of disjoint parts of the ids (the out-of-core path
    checks each slice, where equal ids always land together), so the error is that of all ids at once."""
    count = sum(n for n, _ in found)
    if count:
        dup = sorted(i for _, sample in found for i in sample)[:5]
        raise DataError(f"ids must be unique; {count} are repeated, e.g. {dup}", ids=dup)


# -- the whole dataset -----------------------------------------------------------------------------
def check_not_empty(n_rows: int, where: str | None = None) -> None:
    if n_rows == 0:
        name = f"the dataset {where}" if where else "the dataset"
        raise DataError(f"{name} is empty; fit needs at least shards x slices rows")


def check_row_count(n_rows: int, shards: int, slices: int) -> None:
    """At least one training row per slice of every shard."""
    if n_rows < shards * slices:
        raise DataError(
            f"{n_rows} rows is fewer than shards x slices = {shards} x {slices}; lower sharding.shards or sharding.slices"
        )


def check_training(X, y, ids, shards: int, slices: int):
    """Validated (X float32, y int64, ids, id_kind) of an in-memory dataset."""
    X = check_features(X)
    check_not_empty(len(X))
    y = check_labels(y, len(X))
    ids, kind = check_ids(np.arange(len(X)) if ids is None else ids, len(X))
    check_unique(repeated_ids(ids))
    check_row_count(len(X), shards, slices)
    return X, y, ids, kind


# -- deletion priors (risk) --------------------------------------------------------------------------
def check_risk(risk, n_rows: int, classes: dict | None = None, what: str = "risk") -> np.ndarray:
    """One deletion prior per row as float64 in [0, 1]: numbers, or class names mapped by ``classes``
    (``sharding.risk_classes``). Names the first bad row; the class names known when one is not."""
    arr = np.asarray(risk, dtype=object) if not isinstance(risk, np.ndarray) else risk
    if arr.ndim != 1:
        raise DataError(f"{what} must be one value per row (a 1-D sequence), got shape {arr.shape}")
    if len(arr) != n_rows:
        raise DataError(f"{what} has {len(arr)} entries but there are {n_rows} rows; give one prior per row")
    stream = RiskCheck(classes, what)
    out = stream.add(arr)
    stream.finish()
    return out


class RiskCheck:
    """`check_risk` over the chunks of a stream (`shards.ingest`): `add` gives each chunk's priors (NaN where a
    value is bad) and `finish` raises the DataError `check_risk` raises for all rows at once, with the same
    message (first bad row, counts, unknown class names over the whole stream). A column holds class names
    or numbers, not both (the out-of-core path checks the column's type is the same in every file)."""

    def __init__(self, classes: dict | None = None, what: str = "risk"):
        self.classes, self.what = classes or {}, what
        self.rows = 0
        self.named = False  # some value is a class name: every other value must be one too
        self.unknown: set[str] = set()
        self.nulls = False  # a None (unknown as a class name; refused as a number)
        self.invalid = self.nonnumeric = False
        self.bad: list[int] = []  # out of [0, 1]: the first five rows
        self.bad_count, self.bad_value = 0, None

    def add(self, chunk) -> np.ndarray:
        arr = np.asarray(chunk, dtype=object) if not isinstance(chunk, np.ndarray) else chunk
        first, vals = self.rows, arr.tolist()
        self.rows += len(vals)
        self.nulls |= any(v is None for v in vals)
        if arr.dtype.kind in "USO" and any(isinstance(v, (str, bytes)) for v in vals):
            self.named = True
            vals = [v.decode() if isinstance(v, bytes) else v for v in vals]
            self.unknown.update(str(v) for v in vals if v is not None and (not isinstance(v, str) or v not in self.classes))
            return np.array([float(self.classes.get(v, np.nan)) if isinstance(v, str) else np.nan for v in vals])
        if arr.dtype.kind == "b" or any(isinstance(v, (bool, np.bool_)) for v in vals):
            self.invalid = True
            return np.full(len(vals), np.nan)
        try:
            out = np.asarray([np.nan if v is None else v for v in vals] if arr.dtype.kind == "O" else arr, np.float64)
        except (TypeError, ValueError):
            self.nonnumeric = True
            return np.full(len(vals), np.nan)
        bad = np.flatnonzero(~np.isfinite(out) | (out < 0) | (out > 1))
        bad = bad[[vals[k] is not None for k in bad]] if arr.dtype.kind == "O" and len(bad) else bad
        if len(bad) and self.bad_value is None:
            self.bad_value = float(out[bad[0]])
        self.bad.extend((first + bad[: 5 - len(self.bad)]).tolist())
        self.bad_count += len(bad)
        return out

    def finish(self) -> None:
        """Raise the DataError of the bad values seen, if any."""
        what = self.what
        if self.named:
            unknown = sorted(self.unknown | ({"None"} if self.nulls else set()))
            if unknown:
                known = ", ".join(sorted(self.classes)) or "none: set sharding.risk_classes"
                raise DataError(
                    f"{what} names {len(unknown)} unknown class(es), e.g. {unknown[:5]}; known classes: {known}",
                    problems=[f"unknown risk class {u!r}" for u in unknown[:5]],
                )
            return
        if self.invalid or self.nulls:
            raise DataError(f"{what} must be numbers in [0, 1] or class names, not booleans or None")
        if self.nonnumeric:
            raise DataError(f"{what} must be numbers in [0, 1] or class names (sharding.risk_classes)")
        if self.bad_count:
            raise DataError(
                f"{what} must be a probability in [0, 1] for every row; row {self.bad[0]} has {self.bad_value!r} "
                f"({self.bad_count} bad row(s))",
                rows=self.bad[:5],
            )
