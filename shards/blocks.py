"""Pure per-block steps of partitioning, shared by the single-process ingest (`shards.ingest`) and the
cluster ingest (`orchestration.ingest`), so both give the same errors and the same bytes:

- `check_rows`: the `shards.validation` rules for one chunk of rows, naming rows by dataset row number;
- `place_chunk`: every row's bucket (``shard * R + slice``, `EVAL` for a held-out row) and rank, from the
  keyed hashes of `shards.partition`;
- `make_group_rows` and `sorted_bytes`: one slice file's bytes (`shards.schema` row schema) from its rows in
  any order, sorted by (rank, dataset row number): the canonical order of `shards.partition.split_rows`,
  whose stable sort breaks rank ties by source order.
"""

from __future__ import annotations

import numpy as np

from shards import validation as check
from shards.partition import assign, canonical_ids, holdout_mask
from shards.schema import npy_header, row_dtype

EVAL = -1  # the bucket of held-out evaluation rows


def check_rows(ids_arr, labels, X: np.ndarray, first: int, kind: str | None, cols):
    """Canonical ids, int64 labels and the id kind of one chunk: arrow id and label arrays of ``cols``
    (`shards.parquet.Columns`), float32 features; ``first`` is the dataset row number of its first row and
    ``kind`` the id kind every chunk must have (None: not known yet)."""
    check.check_missing(ids_arr, "id", cols.id, first, cols.where)
    check.check_missing(labels, "label", cols.label, first, cols.where)
    ids, got = canonical_ids(ids_arr.to_numpy(zero_copy_only=False))
    got = check.check_id_kind(got, kind, first)
    check.check_finite(X, first)
    y = check.check_labels(labels.to_numpy(zero_copy_only=False), len(X), first_row=first)
    return ids, y, got


def place_chunk(ids, seed: int, shards: int, slices: int, test_fraction: float, risk=None, placement=None):
    """(bucket, rank) of every row: `EVAL` for rows held out (`shards.partition.holdout_mask`)."""
    held = holdout_mask(ids, seed, test_fraction)
    bucket = np.full(len(ids), EVAL, np.int64)
    rank = np.zeros(len(ids), np.uint64)
    keep = ~held
    if keep.any():
        r = risk[keep] if risk is not None else None
        shard, sl, rk = assign(ids[keep], seed, shards, slices, r, placement)
        bucket[keep], rank[keep] = shard * slices + sl, rk
    return bucket, rank


def make_group_rows(kind: str, ids, y, X, feature_shape, risk=None) -> np.ndarray:
    """Rows of the row schema (`shards.schema.row_dtype`) in the given order, the str id field as wide as
    the longest id."""
    n = len(y)
    width = max([1, *np.char.str_len(np.asarray(ids, dtype=str)).tolist()]) if kind == "str" and n else 1
    rows = np.zeros(n, dtype=row_dtype(kind, width, tuple(feature_shape), risk is not None))
    if n:
        rows["id"], rows["y"], rows["x"] = ids, y, X
        if risk is not None:
            rows["risk"] = risk
    return rows


def sorted_bytes(rows: np.ndarray, rank, pos=None) -> bytearray:
    """What `shards.schema.encode_rows` writes for ``rows`` sorted by ``rank`` (ties: by ``pos``, the dataset
    row number; None: the given order), built in place: the header, then the sorted rows."""
    n = len(rows)
    header = npy_header(rows.dtype, n)
    h = len(header)
    data = bytearray(h + rows.nbytes)
    data[:h] = header
    order = np.argsort(rank, kind="stable") if pos is None else np.lexsort((pos, rank))
    # mode="clip": the indices are valid anyway, and the default mode would buffer a full copy
    np.take(rows, order, axis=0, out=np.frombuffer(data, dtype=rows.dtype, offset=h, count=n), mode="clip")
    return data
