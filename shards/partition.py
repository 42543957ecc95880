"""Which shard and slice a row belongs to: a pure function of (id, seed, S, R), and of the row's deletion
prior (its risk) under a deletion-aware placement.

A keyed BLAKE2b hash of the id's canonical bytes gives three independent 64-bit draws: the shard, the
slice and the row's rank inside its slice. Removing rows therefore never moves any other row, and the
order of rows inside a slice depends only on ids and the seed.

Placements (`Placement`, ``sharding.placement``): ``uniform`` (the draws alone: every row equally likely
anywhere); ``late_slices`` (a *likely* row, risk >= threshold, goes to the last slice of its shard, the
others to slices 1..R-1); ``isolated_shards`` (likely rows go to the last k shards, the others to the
first S-k). The draws are the same in every placement, and the risk only picks the range they are reduced
into, so a row's place is a pure function of (id, seed, risk): deleting or adding other rows never moves it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

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


PLACEMENTS = ("uniform", "late_slices", "isolated_shards")


@dataclass(frozen=True)
class Placement:
    """How the risk of a row steers its place: ``kind`` (one of `PLACEMENTS`), the ``threshold`` from which
    a row counts as likely to be erased, and ``isolated``, the number of shards of likely rows."""

    kind: str = "uniform"
    threshold: float = 0.1
    isolated: int = 1

    @property
    def uniform(self) -> bool:
        return self.kind == "uniform"

    def likely(self, risk) -> np.ndarray:
        return np.asarray(risk, dtype=np.float64) >= self.threshold

    def place(self, a: int, b: int, likely: bool, shards: int, slices: int) -> tuple[int, int]:
        """Shard and slice from the two draws ``a``, ``b`` and whether the row is likely to be erased."""
        if self.kind == "late_slices" and slices > 1:
            return a % shards, (slices - 1 if likely else b % (slices - 1))
        if self.kind == "isolated_shards" and shards > self.isolated:
            k = self.isolated
            return ((shards - k) + a % k if likely else a % (shards - k)), b % slices
        return a % shards, b % slices


UNIFORM = Placement()


def assign(ids, seed: int, shards: int, slices: int, risk=None, placement: Placement | None = None):
    """Shard, slice and in-slice rank (uint64) of every id (``risk``: one prior per id, for a deletion-aware
    ``placement``)."""
    d = _all_draws(ids.tolist() if hasattr(ids, "tolist") else list(ids), partition_key(seed))
    rank = d[:, 2].copy()
    if placement is None or placement.uniform:
        return (d[:, 0] % np.uint64(shards)).astype(np.int64), (d[:, 1] % np.uint64(slices)).astype(np.int64), rank
    likely = placement.likely(risk)
    placed = [placement.place(a, b, bool(lk), shards, slices) for (a, b), lk in zip(d[:, :2].tolist(), likely)]
    where = np.array(placed, dtype=np.int64).reshape(-1, 2)
    return where[:, 0].copy(), where[:, 1].copy(), rank


def _all_draws(ids: list, key: bytes) -> np.ndarray:
    """`_draws` of every id as an (n, 3) uint64 array: one keyed hasher copied per id (the key's block is
    hashed once), the digests' words read in one go."""
    keyed = hashlib.blake2b(key=key, digest_size=24)
    out = bytearray(24 * len(ids))
    for k, i in enumerate(ids):
        h = keyed.copy()
        h.update(id_bytes(i))
        out[24 * k : 24 * k + 24] = h.digest()
    return np.frombuffer(bytes(out), dtype="<u8").reshape(-1, 3)


def shard_of(i, seed: int, shards: int, slices: int, risk=None, placement: Placement | None = None) -> tuple[int, int]:
    a, b, _ = _draws(i, partition_key(seed))
    if placement is None or placement.uniform:
        return a % shards, b % slices
    return placement.place(a, b, bool(placement.likely([risk])[0]), shards, slices)


def candidates(i, seed: int, shards: int, slices: int, placement: Placement | None = None) -> list[tuple[int, int]]:
    """Every (shard, slice) the id can be in, whatever its risk: one under the uniform placement, at most two
    (unlikely, likely) otherwise. Lets `locate` find a row without knowing its prior."""
    a, b, _ = _draws(i, partition_key(seed))
    if placement is None or placement.uniform:
        return [(a % shards, b % slices)]
    out = [placement.place(a, b, False, shards, slices), placement.place(a, b, True, shards, slices)]
    return out[:1] if out[0] == out[1] else out


def split_rows(ids, seed: int, shards: int, slices: int, risk=None, placement: Placement | None = None):
    """Row indices of every (shard, slice), each in its canonical order."""
    shard, sl, rank = assign(ids, seed, shards, slices, risk, placement)
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
