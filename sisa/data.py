"""Loading and checking training data: built-in digits and synthetic sets, numpy arrays, .npz, CSV, Parquet.

Every check raises a DataError that names what to change. No data-dependent preprocessing happens here:
anything fitted on all rows (a scaler, say) would leak deleted rows into the survivors' models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shards.errors import DataError
from shards.partition import canonical_ids, holdout_mask


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
    """Read a .npz (arrays X, y and optionally ids), a CSV or a Parquet file with id and label columns."""
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
            return z["X"], z["y"], (z["ids"] if "ids" in z.files else None)
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pq.read_table(path) if suffix in (".parquet", ".pq") else pacsv.read_csv(path)
    cols = table.column_names
    for col, what in ((label_column, "data.label_column"), (id_column, "data.id_column")):
        if col not in cols:
            raise DataError(f"{path} has no column {col!r} (columns: {cols[:10]}); set {what}")
    feats = [c for c in cols if c not in (id_column, label_column)]
    X = np.column_stack([table[c].to_numpy(zero_copy_only=False) for c in feats]).astype(np.float32)
    return X, table[label_column].to_numpy(zero_copy_only=False), table[id_column].to_numpy(zero_copy_only=False)


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
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(X):
        raise DataError(f"labels must be a 1-d array with one label per row: got shape {y.shape} for {len(X)} rows")
    if y.dtype.kind == "f" and not np.all(np.mod(y, 1) == 0):
        raise DataError("labels must be integer class indices 0..K-1; encode them, e.g. with sklearn's LabelEncoder")
    if y.dtype.kind not in "iuf" or (len(y) and y.min() < 0):
        raise DataError("labels must be integer class indices 0..K-1; encode them, e.g. with sklearn's LabelEncoder")
    y = y.astype(np.int64)
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
    """Split off the evaluation rows by a keyed hash of their id (stable under deletion)."""
    mask = holdout_mask(ids, seed, fraction)
    return (X[~mask], y[~mask], ids[~mask]), (X[mask], y[mask])
