"""Loading and checking training data: built-in digits and synthetic sets, numpy arrays, .npz, CSV, Parquet.

Every check raises a DataError that names what to change. No data-dependent preprocessing happens here:
anything fitted on all rows (a scaler, say) would leak deleted rows into the survivors' models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shards.errors import DataError
from shards.ids import canonical_ids, parse_text_ids
from shards.partition import holdout_mask


def builtin(source: str, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, ids) of a built-in set; ids are stable strings like "digits-17"."""
    from sklearn import datasets

    if source == "digits":
        X, y = datasets.load_digits(return_X_y=True)
        X = (X / 16.0).astype(np.float32)  # fixed scale of the 0..16 pixel range, not fitted
    else:
        s = cfg.synthetic
        X, y = datasets.make_classification(
            n_samples=s.n_samples,
            n_features=s.n_features,
            n_informative=s.n_informative,
            n_redundant=0,
            n_classes=s.n_classes,
            class_sep=s.class_sep,
            flip_y=s.flip_y,
            random_state=0,
        )
        X = X.astype(np.float32)
    ids = np.array([f"{source}-{i}" for i in range(len(y))])
    return X, y, ids


def from_file(path: Path, id_column: str, label_column: str):
    """(X, y, ids, feature_names) of a .npz (arrays X, y and optionally ids; no names), a CSV or a Parquet
    file with id and label columns. A CSV id column is read as text: it holds int ids only when every value
    is a canonical decimal int (so "007" stays the string "007"), see `shards.ids`."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            missing = {"X", "y"} - set(z.files)
            if missing:
                raise DataError(
                    f"{path} lacks arrays {sorted(missing)}; save it with np.savez(path, X=..., y=..., ids=...)"
                )
            return z["X"], z["y"], (z["ids"] if "ids" in z.files else None), None
    table = read_table(path, text_columns=(id_column,))
    cols = table.column_names
    for col, what in ((label_column, "data.label_column"), (id_column, "data.id_column")):
        if col not in cols:
            raise DataError(f"{path} has no column {col!r} (columns: {cols[:10]}); set {what}")
    feats = [c for c in cols if c not in (id_column, label_column)]
    X = table_features(table, feats, str(path))
    raw_ids = table[id_column]
    if raw_ids.null_count:
        raise DataError(f"{path}: id column {id_column!r} has {raw_ids.null_count} empty value(s); every row needs an id")
    if suffix == ".csv":
        ids, _ = parse_text_ids(raw_ids.to_pylist())
    else:
        ids = raw_ids.to_numpy(zero_copy_only=False)
    return X, table[label_column].to_numpy(zero_copy_only=False), ids, feats


def read_table(path: Path, text_columns=()):
    """A CSV or Parquet file as a pyarrow Table; ``text_columns`` of a CSV are read as text, never inferred
    (an id "007" must not become the number 7)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pq.read_table(path)
        opts = pacsv.ConvertOptions(column_types={c: pa.string() for c in text_columns}, strings_can_be_null=False)
        return pacsv.read_csv(path, convert_options=opts)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path} is not a readable CSV or Parquet file: {e}", path=str(path)) from None


def table_features(table, names: list[str], where: str) -> np.ndarray:
    """The named columns of a pyarrow Table as float32 features, in that order; non-numeric columns and
    missing values are refused with the column's name."""
    import pyarrow as pa

    if not names:
        raise DataError(f"{where} has no feature columns")
    out = []
    for c in names:
        col = table[c]
        t = col.type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            kind = "string" if pa.types.is_string(t) or pa.types.is_large_string(t) else t
            raise DataError(
                f"{where}: feature column {c!r} has type {kind}; features must be numeric: encode it "
                "(e.g. one-hot or ordinal) or drop it before fitting or predicting"
            )
        if col.null_count:
            raise DataError(f"{where}: feature column {c!r} has {col.null_count} missing value(s); impute or drop them")
        out.append(col.to_numpy(zero_copy_only=False))
    return np.column_stack(out).astype(np.float32)


def select_features(X, feature_names: list[str] | None, id_column: str, label_column: str):
    """Prediction input matched to the training features by name.

    A pandas DataFrame or pyarrow Table gives its columns by name: the id and label columns are dropped by
    name, the rest must be exactly the training features (any order; a missing or unknown column is an
    error). Arrays are positional, as at fit. An ensemble fitted from arrays has no names: a table's
    columns (without id and label) are then taken in their order and their count is checked by shape."""
    table = _as_table(X)
    if table is None:
        return X
    cols = [c for c in table.column_names if c not in (id_column, label_column)]
    if feature_names is None:
        return table_features(table, cols, "the input")
    missing = [c for c in feature_names if c not in cols]
    unknown = [c for c in cols if c not in feature_names]
    if missing or unknown:
        parts = ([f"missing {missing[:10]}"] if missing else []) + ([f"unknown {unknown[:10]}"] if unknown else [])
        raise DataError(
            "the input's columns do not match the training features (" + "; ".join(parts) + "); give exactly the "
            f"feature columns the ensemble was trained on (in any order): {feature_names[:20]}",
            problems=parts,
        )
    return table_features(table, list(feature_names), "the input")


def is_table(X) -> bool:
    """A pandas DataFrame or pyarrow Table (inputs whose columns have names)."""
    import pyarrow as pa

    return isinstance(X, pa.Table) or (type(X).__name__ == "DataFrame" and hasattr(X, "columns"))


def table_columns(X) -> list:
    return list(X.column_names if hasattr(X, "column_names") else X.columns)


def _as_table(X):
    import pyarrow as pa

    if isinstance(X, pa.Table):
        return X
    if type(X).__name__ == "DataFrame" and hasattr(X, "columns"):
        if len(set(map(str, X.columns))) != len(X.columns):
            raise DataError("the input's column names repeat; give each feature column once")
        return pa.Table.from_pandas(X.rename(columns=str), preserve_index=False)
    return None


def check_labels(y, n_rows: int, what: str = "labels") -> np.ndarray:
    """Integer class indices 0..K-1 as int64, one per row; anything else is a DataError saying what to do."""
    y = np.asarray(y)
    hint = "encode them as integer class indices 0..K-1, e.g. with sklearn's LabelEncoder"
    if y.ndim != 1 or len(y) != n_rows:
        raise DataError(f"{what} must be a 1-d array with one label per row: got shape {y.shape} for {n_rows} rows")
    if y.dtype.kind not in "iuf":
        raise DataError(f"{what} have dtype {y.dtype}; {hint}")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and np.all(np.mod(y, 1) == 0)):
        raise DataError(f"{what} hold fractional or non-finite values; {hint}")
    if len(y) and y.min() < 0:
        raise DataError(f"{what} hold a negative value ({y.min()}); {hint}")
    return y.astype(np.int64)


def is_uri(path) -> bool:
    """True for a URI such as s3://bucket/key (file:// counts as a local path)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def parquet_source(X, y, ids, eval_set, cfg, resolve) -> str | None:
    """The Parquet path or URI that `fit` streams from (out of core, see `shards.ingest`), or None.

    Either ``fit("data.parquet")`` / ``fit("s3://bucket/train/")`` (used as given), or no arrays and
    ``data.source: parquet`` in the config (``data.path`` is a URI, or a path inside the workdir).
    """
    if isinstance(X, (str, Path)):
        if y is not None or ids is not None or eval_set is not None:
            raise DataError(
                "fit(path) reads labels and ids from the Parquet columns data.label_column and data.id_column, and "
                "holds out data.test_fraction of the rows for evaluation; do not also pass y, ids or eval_set"
            )
        return str(X)
    if X is None and y is None and cfg.source == "parquet":
        return cfg.path if is_uri(cfg.path) else str(resolve(cfg.path.removeprefix("file://")))
    return None


def check_features(X, input_shape=None) -> np.ndarray:
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
    if not np.isfinite(X).all():
        bad = np.argwhere(~np.isfinite(X).reshape(len(X), -1).all(1)).ravel()
        raise DataError(
            f"features contain NaN or inf in {len(bad)} row(s) (first at row {bad[0]}); impute or drop them",
            rows=bad[:10].tolist(),
        )
    return X


def check_training(X, y, ids, shards: int, slices: int):
    """Validated (X float32, y int64, ids, id_kind)."""
    X = check_features(X)
    if len(X) == 0:
        raise DataError("the dataset is empty; fit needs at least shards x slices rows")
    y = check_labels(y, len(X))
    if ids is None:
        ids = np.arange(len(X))
    ids, kind = canonical_ids(ids)
    if len(ids) != len(X):
        raise DataError(f"ids has {len(ids)} entries but there are {len(X)} rows; give one id per row")
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1][:5].tolist()
        raise DataError(f"ids must be unique; {int((counts > 1).sum())} are repeated, e.g. {dup}", ids=dup)
    if len(X) < shards * slices:
        raise DataError(
            f"{len(X)} rows is fewer than shards x slices = {shards} x {slices}; lower sharding.shards or sharding.slices"
        )
    return X, y, ids, kind


def split_holdout(X, y, ids, seed: int, fraction: float):
    """Split off the evaluation rows, with their ids, by a keyed hash of their id (stable under deletion)."""
    mask = holdout_mask(ids, seed, fraction)
    return (X[~mask], y[~mask], ids[~mask]), (X[mask], y[mask], ids[mask])
