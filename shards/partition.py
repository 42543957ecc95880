"""Which shard and slice a row belongs to: a pure function of (id, seed, S, R).

A keyed BLAKE2b hash of the id's canonical bytes gives three independent 64-bit draws: the shard, the
slice and the row's rank inside its slice. Removing rows therefore never moves any other row, and the
order of rows inside a slice depends only on ids and the seed.
"""

from __future__ import annotations

import hashlib

import numpy as np

from shards.ids import canonical_ids  # noqa: F401  (re-exported: the one canonicalisation)


def id_bytes(i) -> bytes:
    if isinstance(i, (int, np.integer)):
        return b"i:" + str(int(i)).encode()
    return b"s:" + str(i).encode("utf-8")


def _draws(i, key: bytes) -> tuple[int, int, int]:
    d = hashlib.blake2b(id_bytes(i), key=key, digest_size=24).digest()
    return (
        int.from_bytes(d[0:8], "little"),
        int.from_bytes(d[8:16], "little"),
        int.from_bytes(d[16:24], "little"),
    )


def partition_key(seed: int) -> bytes:
    return hashlib.sha256(f"sisa-partition-{seed}".encode()).digest()[:32]


def assign(ids, seed: int, shards: int, slices: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shard, slice and in-slice rank (uint64) of every id."""
    key = partition_key(seed)
    n = len(ids)
    shard = np.empty(n, np.int64)
    sl = np.empty(n, np.int64)
    rank = np.empty(n, np.uint64)
    for k, i in enumerate(ids.tolist() if hasattr(ids, "tolist") else ids):
        a, b, c = _draws(i, key)
        shard[k] = a % shards
        sl[k] = b % slices
        rank[k] = c
    return shard, sl, rank


def shard_of(i, seed: int, shards: int, slices: int) -> tuple[int, int]:
    a, b, _ = _draws(i, partition_key(seed))
    return a % shards, b % slices


def split_rows(ids, seed: int, shards: int, slices: int) -> dict[tuple[int, int], np.ndarray]:
    """Row indices of every (shard, slice), each in its canonical order."""
    shard, sl, rank = assign(ids, seed, shards, slices)
    out: dict[tuple[int, int], np.ndarray] = {}
    order = np.lexsort((rank, sl, shard))
    bounds = shard[order] * slices + sl[order]
    starts = np.searchsorted(bounds, np.arange(shards * slices), side="left")
    ends = np.searchsorted(bounds, np.arange(shards * slices), side="right")
    for s in range(shards):
        for j in range(slices):
            k = s * slices + j
            out[(s, j)] = order[starts[k] : ends[k]]
    return out


def holdout_mask(ids, seed: int, fraction: float) -> np.ndarray:
    """Stable train/test split: True for rows held out for evaluation."""
    if fraction <= 0:
        return np.zeros(len(ids), bool)
    key = hashlib.sha256(f"sisa-holdout-{seed}".encode()).digest()[:32]
    draws = np.array([_draws(i, key)[0] for i in ids.tolist()], dtype=np.uint64)
    return draws < np.uint64(int(fraction * 2**64))
