"""Out-of-core partitioning of a Parquet dataset into the shard/slice store.

The driver never holds the dataset. One streaming pass reads the Parquet file(s) (a local path or any
fsspec URI such as ``s3://bucket/train/``) a row group or a batch at a time, checks each chunk (the rules of
`shards.validation`, shared with the in-memory path, so the same bad data gives the same error), computes
every row's shard, slice and rank from its id (a pure function of the id, see `shards.partition`) and
appends the rows to a local spill file per (shard, slice). Then each slice is loaded alone, checked for
duplicate ids (equal ids always land in the same slice), sorted by its canonical rank and written in the
row schema of `shards.schema` (header and rows built in place), so the files are byte-identical to those
of the in-memory path for the same rows and ids. Held-out evaluation rows (a keyed hash of the id, as in
memory) go to ``eval_path``.

Peak driver memory is about one chunk plus one slice: a row group is read whole only when it is smaller
than ``row_group_budget`` bytes; a larger one is read a column at a time into a disk-backed buffer and
processed in batches from there. Spill files need local disk about the size of the dataset; they are
overwritten with zeros and removed at the end, also on failure.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from shards import validation as check
from shards.errors import DataError
from shards.partition import Placement, assign, canonical_ids, holdout_mask
from shards.schema import npy_header, row_dtype, row_fields
from shards.storage import Storage, atomic_path, zero_and_remove
from shards.store import write_encoded

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")


@dataclass
class Ingested:
    slices: list[list[dict]]  # per shard, the slice entries written to storage
    id_kind: str
    input_shape: list[int]
    max_label: int
    rows: int  # training rows
    eval_rows: int
    feature_names: list[str] | None = None  # the feature columns, in the order the model sees them


def parquet_files(source: str, options: dict | None = None) -> tuple[object, list[str]]:
    """The fsspec filesystem and the sorted Parquet files of ``source`` (a file, a directory or a URI)."""
    fs, path = fsspec.core.url_to_fs(str(source), **(options or {}))
    try:
        if fs.isdir(path):
            files = sorted(
                p
                for p in fs.find(path)
                if p.lower().endswith(PARQUET_SUFFIXES) and not posixpath.basename(p).startswith(("_", "."))
            )
            if not files:
                raise DataError(f"{source} is a directory without .parquet files", path=str(source))
            return fs, files
        if not fs.exists(path):
            raise DataError(f"data file {source} does not exist", path=str(source))
    except DataError:
        raise
    except Exception as e:  # unreachable endpoint, no permission ...
        raise DataError(
            f"cannot read {source}: {type(e).__name__}: {e}; check the path and, for a URI, storage.options "
            "or the credentials in the environment",
            path=str(source),
        ) from e
    return fs, [path]


def _open(fs, path: str):
    import pyarrow.parquet as pq

    src = path if isinstance(fs, LocalFileSystem) else fs.open(path, "rb")
    try:
        return pq.ParquetFile(src, pre_buffer=False, buffer_size=1 << 20)
    except Exception as e:
        raise DataError(f"{path} is not a readable Parquet file ({type(e).__name__}: {e})", path=path) from e


class _Columns:
    """Which columns are ids, labels and features (`shards.validation` rules), and the numpy type the
    features are combined in."""

    def __init__(self, schema, id_column: str, label_column: str, where: str, risk_column: str | None = None):
        names = schema.names
        self.features = check.check_columns(names, id_column, label_column, where)
        self.risk, self.risk_type = risk_column, None
        if risk_column:  # the deletion priors (data.risk_column): never a feature, as in `sisa.data.from_file`
            if risk_column not in names:
                raise DataError(f"{where} has no column {risk_column!r} (data.risk_column)", path=where)
            self.features = check.feature_columns(self.features, (risk_column,), where)
            self.risk_type = schema.field(risk_column).type
        check.check_id_type(schema, id_column)
        self.common = np.result_type(*check.feature_dtypes(schema, self.features, where))  # as np.column_stack
        self.id, self.label, self.names, self.where = id_column, label_column, names, where

    def check_same(self, other: _Columns, where: str) -> None:
        if other.names != self.names:
            raise DataError(f"{where} has columns {other.names[:10]}, unlike the first file's {self.names[:10]}")
        if other.risk_type != self.risk_type:
            raise DataError(
                f"{where}: risk column {self.risk!r} has type {other.risk_type}, unlike the first file's "
                f"{self.risk_type}; priors are numbers or class names in every file"
            )


class _Spill:
    """Rows appended per (shard, slice) to local files, plus the held-out rows in their original order."""

    def __init__(self, root: str, shards: int, slices: int, seed: int, test_fraction: float, placement=None, classes=None):
        self.root, self.S, self.R = root, shards, slices
        self.placement = placement if isinstance(placement, Placement) and not placement.uniform else None
        self.risk = check.RiskCheck(classes, "risk") if self.placement else None
        self.seed, self.test_fraction = seed, test_fraction
        self.counts = np.zeros(shards * slices, np.int64)
        self.id_width = np.ones(shards * slices, np.int64)  # longest str id per slice (1 for int ids)
        self.eval_rows = 0
        self.kind: str | None = None
        self.feature_shape: tuple | None = None
        self.max_label = -1
        self.seen = 0

    def file(self, b) -> str:
        return os.path.join(self.root, f"{b}.spill")

    def add(self, ids_arr, labels, X: np.ndarray, cols: _Columns, risk_arr=None) -> None:
        """Check one chunk (arrow id, label and, under a deletion-aware placement, risk arrays; float32
        features) by `shards.validation` and spill it. Bad priors are raised at the end (`RiskCheck.finish`)."""
        n, first = len(X), self.seen
        self.seen += n
        check.check_missing(ids_arr, "id", cols.id, first, cols.where)
        check.check_missing(labels, "label", cols.label, first, cols.where)
        ids, kind = canonical_ids(ids_arr.to_numpy(zero_copy_only=False))
        self.kind = check.check_id_kind(kind, self.kind, first)
        check.check_finite(X, first)
        y = check.check_labels(labels.to_numpy(zero_copy_only=False), n, first_row=first)
        self.feature_shape = X.shape[1:]
        risk = self.risk.add(np.asarray(risk_arr.to_pylist(), dtype=object)) if self.risk else None
        held = holdout_mask(ids, self.seed, self.test_fraction)
        if held.any():
            self._append("eval", ids[held], y[held], X[held], None)
            self.eval_rows += int(held.sum())
        keep = ~held
        ids, y, X = ids[keep], y[keep], X[keep]
        risk = risk[keep] if risk is not None else None
        if len(y):  # like the in-memory path: the class count comes from the training rows
            self.max_label = max(self.max_label, int(y.max()))
        shard, sl, rank = assign(ids, self.seed, self.S, self.R, risk, self.placement)
        bucket = shard * self.R + sl
        order = np.argsort(bucket, kind="stable")  # keeps source order inside a bucket (the rank tie-break)
        bounds = np.searchsorted(bucket[order], np.arange(self.S * self.R + 1))
        lengths = np.char.str_len(ids) if kind == "str" else None
        for b in np.flatnonzero(np.diff(bounds)):
            idx = order[bounds[b] : bounds[b + 1]]
            self._append(b, ids[idx], y[idx], X[idx], rank[idx], None if risk is None else risk[idx])
            self.counts[b] += len(idx)
            if lengths is not None:
                self.id_width[b] = max(self.id_width[b], int(lengths[idx].max()))

    def _append(self, b, ids, y, X, rank, risk=None) -> None:
        # the chunk's id dtype: widths are fixed when a slice is written
        fields = row_fields(ids.dtype, X.shape[1:], risk is not None)
        if rank is not None:
            fields.insert(0, ("rank", np.uint64))
        rows = np.empty(len(ids), dtype=fields)
        rows["id"], rows["y"], rows["x"] = ids, y, X
        if rank is not None:
            rows["rank"] = rank
        if risk is not None:
            rows["risk"] = risk
        with open(self.file(b), "ab") as f:
            np.save(f, rows, allow_pickle=False)

    def chunks(self, b):
        """The chunks spilled for ``b``, one at a time."""
        path = self.file(b)
        if not os.path.exists(path):
            return
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            while f.tell() < size:
                yield np.load(f, allow_pickle=False)

    def wipe(self) -> None:
        """Overwrite every spill file with zeros, then remove the directory (rows must not linger on disk)."""
        for name in os.listdir(self.root) if os.path.isdir(self.root) else []:
            try:
                zero_and_remove(os.path.join(self.root, name))
            except OSError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def wipe_stale_spills(directory) -> list[str]:
    """Zero and remove spill directories a killed ingest left in ``directory`` (they hold raw rows).
    Call it only while holding the lock of whatever owns ``directory``."""
    gone = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        path = os.path.join(directory, name)
        if name.startswith(".ingest-") and os.path.isdir(path):
            _Spill(path, 1, 1, 0, 0.0).wipe()
            gone.append(path)
    return gone


def _read_file(pf, cols: _Columns, spill: _Spill, batch_bytes: int, row_group_budget: int, scratch: str) -> None:
    feats = cols.features
    batch_rows = max(256, batch_bytes // (8 * len(feats) + 64))
    for g in range(pf.metadata.num_row_groups):
        if pf.metadata.row_group(g).total_byte_size <= row_group_budget:
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=cols.names, use_threads=False):
                for c in feats:
                    check.check_missing(batch.column(c), "feature", c, spill.seen, cols.where)
                X = np.column_stack([batch.column(c).to_numpy(zero_copy_only=False) for c in feats])
                risk = batch.column(cols.risk) if cols.risk else None
                spill.add(batch.column(cols.id), batch.column(cols.label), X.astype(np.float32), cols, risk)
            continue
        # A big row group: one column at a time into a disk-backed (features, rows) buffer.
        ids = pf.read_row_group(g, columns=[cols.id], use_threads=False).column(0).combine_chunks()
        labels = pf.read_row_group(g, columns=[cols.label], use_threads=False).column(0).combine_chunks()
        risk = pf.read_row_group(g, columns=[cols.risk], use_threads=False).column(0).combine_chunks() if cols.risk else None
        n = len(ids)
        path = os.path.join(scratch, "rowgroup.buf")
        buf = np.memmap(path, dtype=np.float32, mode="w+", shape=(len(feats), max(1, n)))
        try:
            for k, c in enumerate(feats):
                col = pf.read_row_group(g, columns=[c], use_threads=False).column(0)
                check.check_missing(col, "feature", c, spill.seen, cols.where)
                # equal to np.column_stack(columns).astype(float32), element by element
                buf[k, :n] = col.to_numpy(zero_copy_only=False).astype(cols.common).astype(np.float32)
                del col
            for a in range(0, n, batch_rows):
                b = min(n, a + batch_rows)
                X = np.ascontiguousarray(buf[:, a:b].T)
                r = risk.slice(a, b - a) if risk is not None else None
                spill.add(ids.slice(a, b - a), labels.slice(a, b - a), X, cols, r)
        finally:
            del buf
            os.remove(path)


def ingest_parquet(
    source: str,
    storage: Storage,
    *,
    seed: int,
    shards: int,
    slices: int,
    id_column: str = "id",
    label_column: str = "label",
    test_fraction: float = 0.0,
    eval_path: str | None = None,
    spill_dir: str | None = None,
    options: dict | None = None,
    batch_bytes: int = 8 << 20,
    row_group_budget: int = 64 << 20,
    risk_column: str | None = None,
    placement: Placement | None = None,
    risk_classes: dict | None = None,
) -> Ingested:
    """Partition the Parquet dataset at ``source`` into ``storage`` without holding it in memory.

    Under a deletion-aware ``placement`` each row's prior is read from ``risk_column`` (`RiskCheck`: the rules
    and messages of the in-memory path), steers its place (`shards.partition.assign`) and is stored with it.
    Raises DataError (naming what to change) on bad data; slice files written before the error are
    left for the caller to purge (they are content-addressed and referenced by no manifest).
    """
    fs, files = parquet_files(source, options)
    os.makedirs(spill_dir or tempfile.gettempdir(), exist_ok=True)
    root = tempfile.mkdtemp(prefix=".ingest-", dir=spill_dir)
    spill = _Spill(root, shards, slices, seed, test_fraction, placement, risk_classes)
    if spill.placement is not None and not risk_column:
        raise DataError(
            f"sharding.placement {placement.kind} places rows by their deletion prior: set data.risk_column to "
            f"the column of {source} that holds each row's prior (a probability in [0, 1] or a class name)"
        )
    try:
        first = None
        for path in files:
            pf = _open(fs, path)
            cols = _Columns(pf.schema_arrow, id_column, label_column, path, risk_column if spill.placement else None)
            if first is None:
                first = cols
            else:
                first.check_same(cols, path)
            _read_file(pf, cols, spill, batch_bytes, row_group_budget, root)
        train = int(spill.counts.sum())
        check.check_not_empty(spill.seen, source)
        if spill.risk is not None:
            spill.risk.finish()
        check.check_row_count(train, shards, slices)
        # equal ids land in the same slice (or both in eval): checked per part, reported as for all rows
        repeated = (
            [check.repeated_ids(np.concatenate([c["id"] for c in spill.chunks("eval")]))] if spill.eval_rows else []
        )
        out: list[list[dict]] = []
        for s in range(shards):
            out.append([_write_slice(storage, spill, s, j, repeated) for j in range(slices)])
        check.check_unique(*repeated)
        if eval_path is not None:
            _write_eval(spill, eval_path)
        return Ingested(
            out, spill.kind, list(spill.feature_shape), spill.max_label, train, spill.eval_rows, list(first.features)
        )
    finally:
        spill.wipe()


def _write_slice(storage: Storage, spill: _Spill, s: int, j: int, repeated: list) -> dict:
    """Write one slice: its rows in canonical order, with the dtype and so the bytes of the in-memory path
    (`shards.schema.encode_rows`). Appends the slice's `repeated_ids` to ``repeated``. Peak memory is
    about twice the slice."""
    b = s * spill.R + j
    n = int(spill.counts[b])
    placed = spill.placement is not None
    dtype = row_dtype(spill.kind, int(spill.id_width[b]), spill.feature_shape, placed)
    rows = np.zeros(n, dtype=dtype)
    rank = np.empty(n, np.uint64)
    at = 0
    for c in spill.chunks(b):
        k = len(c)
        rows["id"][at : at + k], rows["y"][at : at + k], rows["x"][at : at + k] = c["id"], c["y"], c["x"]
        rank[at : at + k] = c["rank"]
        if placed:
            rows["risk"][at : at + k] = c["risk"]
        at += k
    assert at == n and dtype == row_dtype(spill.kind, rows["id"], spill.feature_shape, placed)
    repeated.append(check.repeated_ids(rows["id"]))
    header = npy_header(dtype, n)
    h = len(header)
    data = bytearray(h + rows.nbytes)  # what encode_rows writes, built in place: header, then the sorted rows
    data[:h] = header
    order = np.argsort(rank, kind="stable")
    # mode="clip": the indices are valid anyway, and the default mode would buffer a full copy
    np.take(rows, order, axis=0, out=np.frombuffer(data, dtype=dtype, offset=h, count=n), mode="clip")
    del rows, rank
    entry = write_encoded(storage, s, j, data, n)
    if placed:  # as `shards.store.write_slice`: the slice's summed prior, over its rows in canonical order
        entry["risk"] = float(np.sum(np.frombuffer(data, dtype=dtype, offset=h, count=n)["risk"], dtype=np.float64))
    return entry


def _write_eval(spill: _Spill, eval_path: str) -> None:
    """eval.npy (id, y, x) of the held-out rows in source order, written chunk by chunk into a temp file that
    is then renamed (`shards.storage.atomic_path`): the row schema of a slice file (str ids as wide as the
    longest held-out id), as `sisa.evalfile` writes it, so that `delete` can name and erase these rows."""
    from numpy.lib.format import open_memmap

    kind = spill.kind or "int"
    width = 1
    if kind == "str":
        width = max((int(np.char.str_len(c["id"]).max()) for c in spill.chunks("eval") if len(c)), default=1)
    dtype = row_dtype(kind, width, spill.feature_shape)
    with atomic_path(eval_path) as tmp:
        if spill.eval_rows == 0:
            with open(tmp, "wb") as f:
                np.save(f, np.zeros(0, dtype), allow_pickle=False)
            return
        out = open_memmap(tmp, mode="w+", dtype=dtype, shape=(spill.eval_rows,))
        at = 0
        for c in spill.chunks("eval"):
            k = len(c)
            out["id"][at : at + k], out["y"][at : at + k], out["x"][at : at + k] = c["id"], c["y"], c["x"]
            at += k
        out.flush()
        del out
