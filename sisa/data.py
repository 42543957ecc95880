"""Loading and checking training data: built-in digits and synthetic sets, numpy arrays, .npz, CSV, Parquet.

`read_file` is the one reader of data files (fit's data.path, the CLI's predict input, the audit's row
files). The checks are the rules of `shards.validation`, shared with the out-of-core Parquet path, and
re-exported here. Every check raises a DataError that names what to change. No data-dependent
preprocessing happens here: anything fitted on all rows (a scaler, say) would leak deleted rows into the
survivors' models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shards import validation as check
from shards.errors import DataError
from shards.ids import canonical_ids, parse_text_ids  # noqa: F401  (canonical_ids: re-exported)
from shards.partition import holdout_mask
from shards.validation import check_features, check_labels, check_training  # noqa: F401  (re-exported)

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


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


def read_file(path, arrays=("X",), optional=(), text_columns=(), suffixes=None):
    """The contents of a data file: a dict of numpy arrays for a .npz (``arrays`` required, ``optional``
    when present) or a .npy (``{"X": array}``), a pyarrow Table for a CSV or Parquet file (``text_columns``
    of a CSV read as text). ``suffixes`` limits the accepted kinds; without it any other file is read as CSV.
    Nothing is unpickled."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist", path=str(path))
    suffix = path.suffix.lower()
    if suffixes is not None and suffix not in suffixes:
        raise DataError(f"{path}: unknown input type {suffix!r}; give a {', '.join(suffixes)} file", path=str(path))
    if suffix not in (".npy", ".npz"):
        return read_table(path, text_columns)
    if suffix == ".npy":
        out = {"X": np.load(path, allow_pickle=False)}
    else:
        with np.load(path, allow_pickle=False) as z:
            out = {a: z[a] for a in z.files if a in (*arrays, *optional)}
            held = z.files
    missing = [a for a in arrays if a not in out]
    if missing:
        save = ", ".join(f"{a}=..." for a in (*arrays, *optional))
        has = f"has {held}" if suffix == ".npz" else "a .npy holds only X"
        raise DataError(f"{path} lacks arrays {missing} ({has}); save it with np.savez(path, {save})", path=str(path))
    return out


def from_file(path: Path, id_column: str, label_column: str, risk_column: str | None = None):
    """(X, y, ids, feature_names) of a .npz (arrays X, y and optionally ids; no names), a CSV or a Parquet
    file with id and label columns. A CSV id column is read as text: it holds int ids only when every value
    is a canonical decimal int (so "007" stays the string "007"), see `shards.ids`. With ``risk_column``
    (``data.risk_column``) a fifth item: that column (or npz array), never a feature."""
    extra = (risk_column,) if risk_column else ()
    data = read_file(path, ("X", "y", *extra), ("ids",), text_columns=(id_column,))
    if isinstance(data, dict):
        out = data["X"], data["y"], data.get("ids"), None
        return (*out, data[risk_column]) if risk_column else out
    where = str(path)
    feats = check.check_columns(data.column_names, id_column, label_column, where)
    if risk_column:
        if risk_column not in data.column_names:
            raise DataError(f"{where} has no column {risk_column!r} (data.risk_column)", path=where)
        feats = check.feature_columns(feats, (risk_column,), where)
    check.check_id_type(data.schema, id_column)
    X = table_features(data, feats, where)
    raw_ids, labels = data[id_column], data[label_column]
    check.check_missing(raw_ids, "id", id_column, where=where)
    check.check_missing(labels, "label", label_column, where=where)
    if Path(path).suffix.lower() == ".csv":
        ids, _ = parse_text_ids(raw_ids.to_pylist())
    else:
        ids = raw_ids.to_numpy(zero_copy_only=False)
    out = X, labels.to_numpy(zero_copy_only=False), ids, feats
    return (*out, np.asarray(data[risk_column].to_pylist(), dtype=object)) if risk_column else out


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
    missing values are refused with the column's name (`shards.validation`)."""
    check.feature_columns(names, (), where)
    check.feature_dtypes(table.schema, names, where)
    for c in names:
        check.check_missing(table[c], "feature", c, where=where)
    return np.column_stack([table[c].to_numpy(zero_copy_only=False) for c in names]).astype(np.float32)


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


def split_holdout(X, y, ids, seed: int, fraction: float, risk=None):
    """Split off the evaluation rows, with their ids, by a keyed hash of their id (stable under deletion).
    With ``risk`` (one prior per row) a third item: the training rows' priors."""
    mask = holdout_mask(ids, seed, fraction)
    out = (X[~mask], y[~mask], ids[~mask]), (X[mask], y[mask], ids[mask])
    return (*out, np.asarray(risk)[~mask]) if risk is not None else out
