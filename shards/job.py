"""One stage of one shard as a self-contained job: read its slices and the previous checkpoint from
storage (digest-checked), train, write the new checkpoint under a content-addressed name. Checkpoints are
written without their own fsyncs (a thread starts putting each on disk while the next stage trains);
`StageRunner.finish` makes all of them durable at once, and the executors
call it before a run returns (before the manifest that names them is committed), or ask for it with the
last stage a worker runs (``run(..., finish=True)``: no separate call).

The executor (in-process or a Ray actor) keeps a `StageRunner` warm for the stages of one run: it caches
the shard's rows (`shards.rowcache`: in memory, or in local files it memory-maps) and the last state it produced, both
keyed by digest; `finish` drops both, so between runs a worker holds no row and no model.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

from shards import training
from shards.rowcache import RowCache, Rows
from shards.spec import TrainSpec
from shards.storage import Storage, sync_paths


def checkpoint_name(shard: int, stage: int, digest: str) -> str:
    return f"ckpt/shard-{shard:03d}/stage-{stage:02d}-{digest[:12]}.pt"


def lineage(slice_entries: list[dict], stage: int, start: str | None = None) -> str:
    """Digest of the exact rows stage ``stage`` trained on: the chain of its slice files' digests, after the
    digest of the shared start checkpoint (`shards.base`) when the shards begin from one."""
    h = hashlib.sha256()
    if start:
        h.update(f"start:{start}/".encode())
    for e in slice_entries[:stage]:
        h.update(e["sha256"].encode())
    return h.hexdigest()


class StageRunner:
    def __init__(self):
        self._cache: RowCache | None = None  # the shards' rows, in local files, memory-mapped
        self._state: tuple[str, dict] | None = None
        # checkpoints written without fsync since the last `finish` (before the executor returns)
        self._unsynced: list[tuple[Storage, str]] = []
        self._flushing: list[threading.Thread] = []  # fsyncs started early (`_flush`)

    def _rows(self, storage: Storage, shard: int, entries: list[dict]) -> Rows:
        if self._cache is None:
            self._cache = RowCache()
        return self._cache.rows(storage, shard, entries)

    def _flush(self, paths: list[str]) -> None:
        """Start writing ``paths`` to disk on a thread (an fsync releases the GIL; an error is left to the
        run's last sync, which alone makes the files durable)."""
        if paths:
            t = threading.Thread(target=_fsync_quietly, args=(paths,), daemon=True, name="sisa-ckpt-flush")
            t.start()
            self._flushing = [f for f in self._flushing if f.is_alive()] + [t]

    def finish(self) -> None:
        """The end of an executor's run: its checkpoints durable, the row cache zeroed and emptied (one
        filesystem sync for both where they share one) and the last state dropped, so that no raw row and no
        model outlives the operation that read it (a deletion in another process cannot reach this one)."""
        for t in self._flushing:
            t.join()
        self._flushing = []
        paths = [p for storage, name in self._unsynced for p in storage.local_paths([name])]
        if self._cache is not None:
            self._cache.wipe(sync_also=paths)
        elif paths:
            sync_paths(paths)
        self._unsynced = []
        self._state = None

    def held(self) -> dict:
        """What this runner keeps between calls: cache files, cached rows, and whether a model state."""
        files, rows = self._cache.held() if self._cache is not None else (0, 0)
        return {"cache_files": files, "cached_rows": rows, "state": self._state is not None}

    def drop_cache(self) -> None:
        if self._cache is not None:
            self._cache.wipe()
        self._state = None

    def run(
        self,
        storage: Storage,
        spec: TrainSpec,
        shard: int,
        stage: int,
        slice_entries: list[dict],
        prev: dict | None,
        finish: bool = False,
    ):
        """Train ``stage`` (1-based); ``prev`` is the manifest entry of the checkpoint after stage-1, or None.
        ``finish``: this is the worker's last stage of the run, so `finish` before returning."""
        prev_ckpt = None
        t0 = time.perf_counter()
        if prev is not None:
            if self._state is not None and self._state[0] == prev["sha256"]:
                prev_ckpt = self._state[1]
            else:
                data = storage.read(prev["file"], prev["sha256"])
                prev_ckpt = training.load_checkpoint(data, storage.describe(prev["file"]))
        rows = self._rows(storage, shard, slice_entries[:stage])
        t1 = time.perf_counter()
        ckpt, metrics = training.run_stage(
            spec, shard, stage, prev_ckpt, rows, lineage(slice_entries, stage, spec.extra.get("start"))
        )
        t2 = time.perf_counter()
        data = training.save_checkpoint(ckpt)
        digest = _sha(data)
        name = checkpoint_name(shard, stage, digest)
        storage.write(name, data, durable=False, digest=digest)
        self._unsynced.append((storage, name))
        if not finish:  # its bytes go to disk while the next stage trains: the run's last sync waits less
            self._flush(storage.local_paths([name]))
        self._state = (digest, ckpt)
        if finish:
            self.finish()
        # checkpoint and slice I/O around the compute (``seconds``): read, verify, serialise, write, fsync
        metrics["io_seconds"] = (t1 - t0) + (time.perf_counter() - t2)
        entry = {
            "stage": stage,
            "file": name,
            "sha256": digest,
            "rows": metrics["rows"],
            "lineage": ckpt["lineage"],
        }
        return entry, metrics


def _fsync_quietly(paths: list[str]) -> None:
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
