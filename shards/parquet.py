"""Reading a Parquet dataset a chunk at a time: its files, their columns (the rules of `shards.validation`)
and the chunks of a file's row groups, each with the row number of its first row in the whole dataset.

Shared by the single-process ingest (`shards.ingest`) and the cluster ingest (`orchestration.ingest`),
where each worker reads one row group: the same reading code, the same checks, the same row numbers.
A row group is read whole only when it is smaller than ``row_group_budget`` bytes; a larger one is read a
column at a time into a disk-backed buffer under ``scratch`` and cut into batches from there.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from shards import validation as check
from shards.errors import DataError
from shards.storage import zero_and_remove

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")


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


def open_parquet(fs, path: str):
    """A ``pyarrow.parquet.ParquetFile`` (its footer read, no rows); a DataError naming ``path`` if unreadable."""
    import pyarrow.parquet as pq

    src = path if isinstance(fs, LocalFileSystem) else fs.open(path, "rb")
    try:
        return pq.ParquetFile(src, pre_buffer=False, buffer_size=1 << 20)
    except Exception as e:
        raise DataError(f"{path} is not a readable Parquet file ({type(e).__name__}: {e})", path=path) from e


def id_kind_of(schema, id_column: str) -> str:
    """The id kind an id column's type gives: ``int`` for integers, ``str`` for text or UTF-8 bytes."""
    import pyarrow as pa

    return "int" if pa.types.is_integer(schema.field(id_column).type) else "str"


class Columns:
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
        self.id_kind = id_kind_of(schema, id_column)

    def check_same(self, other: Columns, where: str) -> None:
        if other.names != self.names:
            raise DataError(
                f"{where} has columns {other.names[:10]}, unlike the first file's {self.names[:10]}", path=where
            )
        if other.risk_type != self.risk_type:
            raise DataError(
                f"{where}: risk column {self.risk!r} has type {other.risk_type}, unlike the first file's "
                f"{self.risk_type}; priors are numbers or class names in every file",
                path=where,
            )


@dataclass
class Chunk:
    """Rows of one batch: arrow id, label (and risk) arrays, float32 features, and the dataset row number
    of its first row."""

    ids: object
    labels: object
    X: np.ndarray
    risk: object
    first: int


def iter_chunks(pf, cols: Columns, row_groups, first_row: int, scratch: str,
                batch_bytes: int = 8 << 20, row_group_budget: int = 64 << 20) -> Iterator[Chunk]:  # fmt: skip
    """The chunks of ``row_groups`` of ``pf`` in order; ``first_row`` is the dataset row number of the first."""
    feats = cols.features
    batch_rows = max(256, batch_bytes // (8 * len(feats) + 64))
    at = first_row
    for g in row_groups:
        if pf.metadata.row_group(g).total_byte_size <= row_group_budget:
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=cols.names, use_threads=False):
                for c in feats:
                    check.check_missing(batch.column(c), "feature", c, at, cols.where)
                X = np.column_stack([batch.column(c).to_numpy(zero_copy_only=False) for c in feats])
                risk = batch.column(cols.risk) if cols.risk else None
                yield Chunk(batch.column(cols.id), batch.column(cols.label), X.astype(np.float32), risk, at)
                at += batch.num_rows
            continue
        yield from _big_row_group(pf, cols, g, at, scratch, batch_rows)
        at += pf.metadata.row_group(g).num_rows


def _big_row_group(pf, cols: Columns, g: int, first: int, scratch: str, batch_rows: int) -> Iterator[Chunk]:
    """One column at a time into a disk-backed (features, rows) buffer, then batches from there."""
    feats = cols.features

    def column(name):
        return pf.read_row_group(g, columns=[name], use_threads=False).column(0).combine_chunks()

    ids, labels = column(cols.id), column(cols.label)
    risk = column(cols.risk) if cols.risk else None
    n = len(ids)
    path = os.path.join(scratch, f"rowgroup-{os.getpid()}.buf")
    buf = np.memmap(path, dtype=np.float32, mode="w+", shape=(len(feats), max(1, n)))
    try:
        for k, c in enumerate(feats):
            col = pf.read_row_group(g, columns=[c], use_threads=False).column(0)
            check.check_missing(col, "feature", c, first, cols.where)
            # equal to np.column_stack(columns).astype(float32), element by element
            buf[k, :n] = col.to_numpy(zero_copy_only=False).astype(cols.common).astype(np.float32)
            del col
        for a in range(0, n, batch_rows):
            b = min(n, a + batch_rows)
            X = np.ascontiguousarray(buf[:, a:b].T)
            r = risk.slice(a, b - a) if risk is not None else None
            yield Chunk(ids.slice(a, b - a), labels.slice(a, b - a), X, r, first + a)
    finally:
        del buf
        zero_and_remove(path)  # it held raw features
