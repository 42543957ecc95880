"""The shard/slice store: one small, deterministic .npy file per (shard, slice).

Each file is a structured array of (id, y, x) rows in canonical order, so writing the same rows always
gives the same bytes and the same name (``slice-JJ-<sha12>.npy``). A deletion writes the surviving rows
to a new file and the manifest switches to it; the old file is then purged. Loading never unpickles.
"""

from __future__ import annotations

import io

import numpy as np

from shards.partition import split_rows
from shards.storage import Storage, sha256


def _dtype(id_kind: str, ids: np.ndarray, feature_shape) -> np.dtype:
    id_dt = np.int64 if id_kind == "int" else f"<U{max(1, max((len(s) for s in ids.tolist()), default=1))}"
    return np.dtype([("id", id_dt), ("y", np.int64), ("x", np.float32, tuple(feature_shape))])


def encode_slice(ids: np.ndarray, X: np.ndarray, y: np.ndarray, id_kind: str) -> bytes:
    rows = np.zeros(len(ids), dtype=_dtype(id_kind, ids, X.shape[1:]))
    rows["id"], rows["y"], rows["x"] = ids, y, X
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    return buf.getvalue()


def decode_slice(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def slice_name(shard: int, slice_: int, digest: str) -> str:
    return f"data/shard-{shard:03d}/slice-{slice_:02d}-{digest[:12]}.npy"


def write_slice(storage: Storage, shard: int, slice_: int, rows: np.ndarray) -> dict:
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    data = buf.getvalue()
    digest = sha256(data)
    name = slice_name(shard, slice_, digest)
    storage.write(name, data)
    return {"file": name, "sha256": digest, "rows": int(len(rows))}


def write_partition(storage: Storage, ids, X, y, id_kind: str, seed: int, shards: int, slices: int) -> list[list[dict]]:
    """Split the data and write every slice file; returns per-shard lists of slice entries."""
    groups = split_rows(ids, seed, shards, slices)
    dtype = _dtype(id_kind, ids, X.shape[1:])
    out = []
    for s in range(shards):
        entries = []
        for j in range(slices):
            idx = groups[(s, j)]
            rows = np.zeros(len(idx), dtype=dtype)
            rows["id"], rows["y"], rows["x"] = ids[idx], y[idx], X[idx]
            entries.append(write_slice(storage, s, j, _compact(rows, id_kind)))
        out.append(entries)
    return out


def _compact(rows: np.ndarray, id_kind: str) -> np.ndarray:
    """Narrow the str id field to this slice's longest id, so equal rows give equal bytes."""
    if id_kind != "str":
        return rows
    dtype = _dtype(id_kind, rows["id"], rows["x"].shape[1:])
    return rows.astype(dtype) if dtype != rows.dtype else rows


def read_slice(storage: Storage, entry: dict) -> np.ndarray:
    return decode_slice(storage.read(entry["file"], entry["sha256"]))


def without(rows: np.ndarray, drop_ids: set, id_kind: str) -> np.ndarray:
    keep = np.array([i not in drop_ids for i in rows["id"].tolist()], dtype=bool)
    return _compact(rows[keep], id_kind)
