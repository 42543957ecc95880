"""The shard/slice store: one small, deterministic .npy file per (shard, slice).

Each file holds rows of the row schema (`shards.schema`: ``(id, y, x)``) in canonical order, so writing
the same rows always gives the same bytes and the same name (``slice-JJ-<sha12>.npy``). A deletion writes
the surviving rows to a new file and the manifest switches to it; the old file is then purged. Loading
never unpickles.
"""

from __future__ import annotations

import numpy as np

from shards.partition import Placement, split_rows
from shards.schema import compact, decode_rows, encode_rows, has_risk, make_rows
from shards.storage import Storage, sha256


def encode_slice(ids: np.ndarray, X: np.ndarray, y: np.ndarray, id_kind: str) -> bytes:
    return encode_rows(make_rows(ids, y, X, id_kind))


def decode_slice(data: bytes) -> np.ndarray:
    return decode_rows(data)


def slice_name(shard: int, slice_: int, digest: str) -> str:
    return f"data/shard-{shard:03d}/slice-{slice_:02d}-{digest[:12]}.npy"


def write_encoded(storage: Storage, shard: int, slice_: int, data, n_rows: int) -> dict:
    """Store one slice file's bytes (`shards.schema.encode_rows`) under its content-addressed name; returns
    its manifest entry."""
    digest = sha256(data)
    name = slice_name(shard, slice_, digest)
    storage.write(name, data, digest=digest)
    return {"file": name, "sha256": digest, "rows": int(n_rows)}


def write_slice(storage: Storage, shard: int, slice_: int, rows: np.ndarray) -> dict:
    """Store one slice; with a ``risk`` field its entry also holds the slice's summed deletion prior."""
    entry = write_encoded(storage, shard, slice_, encode_rows(rows), len(rows))
    if has_risk(rows):
        entry["risk"] = float(np.sum(rows["risk"], dtype=np.float64))
    return entry


def write_partition(
    storage: Storage, ids, X, y, id_kind: str, seed: int, shards: int, slices: int, risk=None, placement=None
) -> list[list[dict]]:
    """Split the data and write every slice file; returns per-shard lists of slice entries. With a
    deletion-aware ``placement`` (`shards.partition.Placement`), ``risk`` steers the split and is stored."""
    placed = isinstance(placement, Placement) and not placement.uniform
    groups = split_rows(ids, seed, shards, slices, risk if placed else None, placement if placed else None)
    out = []
    for s in range(shards):
        entries = []
        for j in range(slices):
            idx = groups[(s, j)]
            r = np.asarray(risk, dtype=np.float64)[idx] if placed else None
            entries.append(write_slice(storage, s, j, make_rows(ids[idx], y[idx], X[idx], id_kind, r)))
        out.append(entries)
    return out


def read_slice(storage: Storage, entry: dict) -> np.ndarray:
    return decode_rows(storage.read(entry["file"], entry["sha256"]))


def without(rows: np.ndarray, drop_ids: set, id_kind: str) -> np.ndarray:
    keep = np.array([i not in drop_ids for i in rows["id"].tolist()], dtype=bool)
    return compact(rows[keep], id_kind)
