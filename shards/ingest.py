"""Out-of-core partitioning of a Parquet dataset into the shard/slice store, in one process: the path of
the ``inprocess`` executor (on Ray, `orchestration.ingest` partitions on the cluster with the same reading
and checking code, `shards.parquet` and `shards.blocks`, and writes the same files).

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
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

from shards import validation as check
from shards.blocks import EVAL, check_rows, place_chunk, sorted_bytes
from shards.errors import DataError
from shards.parquet import Columns, iter_chunks, open_parquet, parquet_files
from shards.partition import Placement
from shards.schema import row_dtype, row_fields
from shards.storage import Storage, atomic_path, zero_and_remove
from shards.store import write_encoded


@dataclass
class Ingested:
    slices: list[list[dict]]  # per shard, the slice entries written to storage
    id_kind: str
    input_shape: list[int]
    max_label: int
    rows: int  # training rows
    eval_rows: int
    feature_names: list[str] | None = None  # the feature columns, in the order the model sees them


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

    def add(self, ids_arr, labels, X: np.ndarray, cols: Columns, risk_arr=None) -> None:
        """Check one chunk (arrow id, label and, under a deletion-aware placement, risk arrays; float32
        features) by `shards.validation` and spill it. Bad priors are raised at the end (`RiskCheck.finish`)."""
        n, first = len(X), self.seen
        self.seen += n
        ids, y, self.kind = check_rows(ids_arr, labels, X, first, self.kind, cols)
        self.feature_shape = X.shape[1:]
        risk = self.risk.add(np.asarray(risk_arr.to_pylist(), dtype=object)) if self.risk else None
        bucket, rank = place_chunk(ids, self.seed, self.S, self.R, self.test_fraction, risk, self.placement)
        held = bucket == EVAL
        if held.any():
            self._append("eval", ids[held], y[held], X[held], None)
            self.eval_rows += int(held.sum())
        keep = ~held
        ids, y, X, bucket, rank = ids[keep], y[keep], X[keep], bucket[keep], rank[keep]
        risk = risk[keep] if risk is not None else None
        if len(y):  # like the in-memory path: the class count comes from the training rows
            self.max_label = max(self.max_label, int(y.max()))
        order = np.argsort(bucket, kind="stable")  # keeps source order inside a bucket (the rank tie-break)
        bounds = np.searchsorted(bucket[order], np.arange(self.S * self.R + 1))
        lengths = np.char.str_len(ids) if self.kind == "str" else None
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


def _read_file(pf, cols: Columns, spill: _Spill, batch_bytes: int, row_group_budget: int, scratch: str) -> None:
    groups = range(pf.metadata.num_row_groups)
    for c in iter_chunks(pf, cols, groups, spill.seen, scratch, batch_bytes, row_group_budget):
        spill.add(c.ids, c.labels, c.X, cols, c.risk)


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
            pf = open_parquet(fs, path)
            cols = Columns(pf.schema_arrow, id_column, label_column, path, risk_column if spill.placement else None)
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
    data = sorted_bytes(rows, rank)
    h = len(data) - rows.nbytes
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
