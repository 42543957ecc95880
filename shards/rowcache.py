"""A shard worker's local cache of the rows it trains on: features and labels of slices 1..r, in memory while
the cache holds at most `MEMORY_BYTES` of them (a small shard: no file to write, zero and sync), else as two
flat files per shard, memory-mapped, so that a shard larger than memory trains.

Stage r of a shard trains on slices 1..r, so the files grow by one slice per stage; they are keyed by the
digests of the slices they hold (read digest-checked from the store), so after a deletion the rows from
the first changed slice on are overwritten with zeros, cut off and read again. The data order is not the
cache's business: training re-derives it from (seed, shard, stage, epoch) over rows in slice order.

Cache files hold raw rows: `wipe` zeroes and removes them (at the end of every run, `StageRunner.finish`),
at interpreter exit, and a new cache zeroes the directories that workers killed without wiping left behind.
It zeroes the rows held in memory too before it lets them go.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref

import numpy as np

from shards.schema import FEATURE, LABEL, decode_rows
from shards.storage import Storage, zero_and_remove, zero_and_remove_many

ROOT_ENV = "SISA_ROW_CACHE"  # where the cache directories live (default: the system temp directory)
MEMORY_BYTES = 32 << 20  # rows a cache holds in memory, all shards together; beyond, a shard's rows go to files


class Rows:
    """Rows of slices 1..r as the training code reads them: ``rows["x"]``, ``rows["y"]``, ``len(rows)``."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self._fields = {"x": x, "y": y}

    def __getitem__(self, name: str) -> np.ndarray:
        return self._fields[name]

    def __len__(self) -> int:
        return len(self._fields["y"])


def cache_root(root: str | None = None) -> str:
    base = root or os.environ.get(ROOT_ENV) or os.path.join(tempfile.gettempdir(), "sisa-row-cache")
    os.makedirs(base, exist_ok=True)
    return base


@contextlib.contextmanager
def scratch_dir(root: str | None = None):
    """A private directory for other temporary files of raw rows (an ingest's row-group buffer): zeroed and
    removed afterwards, and by the next cache on this machine if the process is killed first."""
    base = cache_root(root)
    _wipe_orphans(base)
    path = tempfile.mkdtemp(prefix=f"{os.getpid()}-scratch-", dir=base)
    try:
        yield path
    finally:
        _wipe_dir(path)


class RowCache:
    def __init__(self, root: str | None = None):
        base = cache_root(root)
        _wipe_orphans(base)
        self.dir = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base)
        self._finalizer = weakref.finalize(self, _wipe_dir, self.dir)  # also at interpreter exit
        self._held: dict[int, list[tuple[str, int]]] = {}  # shard -> (digest, rows) of the slices it holds
        self._shape: dict[int, tuple] = {}
        self._memory: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # shard -> its slices' (x, y), in memory
        self._joined: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # shard -> its slices joined for the last stage

    def _paths(self, shard: int) -> tuple[str, str]:
        return os.path.join(self.dir, f"shard-{shard}.x"), os.path.join(self.dir, f"shard-{shard}.y")

    def rows(self, storage: Storage, shard: int, entries: list[dict]) -> Rows:
        """The rows of ``entries`` (slice entries, in order), in memory or memory-mapped."""
        held = self._held.get(shard, [])
        keep = 0
        while keep < min(len(held), len(entries)) and held[keep][0] == entries[keep]["sha256"]:
            keep += 1
        if keep < min(len(held), len(entries)):  # a slice changed: what follows it is stale
            self._cut(shard, held, keep)
            held = held[:keep]
        for e in entries[keep:]:
            rows = decode_rows(storage.read(e["file"], e["sha256"]))
            x = np.ascontiguousarray(rows["x"], dtype=FEATURE)
            y = np.ascontiguousarray(rows["y"], dtype=LABEL)
            if len(rows) and not any(k for _, k in held):  # the first rows in the shard's files set the width
                self._shape[shard] = x.shape[1:]
            self._add(shard, x, y)
            held.append((e["sha256"], len(rows)))
        self._held[shard] = held
        n = sum(k for _, k in held[: len(entries)])
        shape = self._shape.get(shard, (0,))
        if n == 0:
            return Rows(np.zeros((0, *shape), FEATURE), np.zeros(0, LABEL))
        if shard in self._memory:
            parts = self._memory[shard][: len(entries)]
            if len(parts) == 1:
                return Rows(parts[0][0], parts[0][1])
            _zero_arrays([self._joined.pop(shard)] if shard in self._joined else [])
            self._joined[shard] = (np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]))
            return Rows(*self._joined[shard])
        px, py = self._paths(shard)
        return Rows(np.memmap(px, FEATURE, "r", shape=(n, *shape)), np.memmap(py, LABEL, "r", shape=(n,)))

    def _add(self, shard: int, x: np.ndarray, y: np.ndarray) -> None:
        """Append one slice's rows: in memory while the cache stays within `MEMORY_BYTES`, else to the
        shard's files (its rows held in memory so far move there first)."""
        in_memory = sum(a.nbytes + b.nbytes for parts in self._memory.values() for a, b in parts)
        files = os.path.exists(self._paths(shard)[0])
        if not files and in_memory + x.nbytes + y.nbytes <= MEMORY_BYTES:
            self._memory.setdefault(shard, []).append((x, y))
            return
        parts = self._memory.pop(shard, [])
        px, py = self._paths(shard)
        for a, b in [*parts, (x, y)]:
            with open(px, "ab") as f:
                f.write(a.tobytes())
            with open(py, "ab") as f:
                f.write(b.tobytes())
        _zero_arrays(parts)

    def _cut(self, shard: int, held: list, keep: int) -> None:
        """Zero the rows after the first ``keep`` slices, then cut them off."""
        if shard in self._memory:
            _zero_arrays(self._memory[shard][keep:])
            del self._memory[shard][keep:]
            return
        n = sum(k for _, k in held[:keep])
        width = int(np.prod(self._shape.get(shard, (0,)))) * FEATURE.itemsize
        for path, size in zip(self._paths(shard), (width, LABEL.itemsize)):
            if os.path.exists(path):
                _zero_tail(path, n * size)

    def held(self) -> tuple[int, int]:
        """(cache files, rows) this cache holds."""
        files = os.listdir(self.dir) if os.path.isdir(self.dir) else []
        return len(files), sum(k for held in self._held.values() for _, k in held)

    def wipe(self, sync_also: list[str] | tuple = ()) -> None:
        """Zero and remove every cache file (they hold raw rows); ``sync_also``: other local files made
        durable by the same filesystem sync as the zeros (`zero_and_remove_many`)."""
        names = os.listdir(self.dir) if os.path.isdir(self.dir) else []
        zero_and_remove_many([os.path.join(self.dir, name) for name in names], sync_also=sync_also)
        for parts in self._memory.values():
            _zero_arrays(parts)
        _zero_arrays(list(self._joined.values()))
        self._memory.clear()
        self._joined.clear()
        self._held.clear()
        self._shape.clear()


def _zero_arrays(parts: list) -> None:
    for x, y in parts:
        x.fill(0)
        y.fill(0)


def _wipe_dir(path: str) -> None:
    for name in os.listdir(path) if os.path.isdir(path) else []:
        zero_and_remove(os.path.join(path, name))
    try:
        os.rmdir(path)
    except OSError:
        pass


def _zero_tail(path: str, keep: int, chunk: int = 1 << 24) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(keep)
        for off in range(keep, size, chunk):
            f.write(b"\0" * min(chunk, size - off))
        f.flush()
        os.fsync(f.fileno())
        f.truncate(keep)


def _wipe_orphans(base: str) -> None:
    """Zero and remove the cache directories of processes that are gone."""
    for name in os.listdir(base):
        pid = name.split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        _wipe_dir(os.path.join(base, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
