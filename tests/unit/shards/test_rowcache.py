"""A shard worker's cached rows (`shards.rowcache`), in memory or in local memory-mapped files: the same
checkpoints as training on the decoded slices; a changed slice and what follows it re-read; no cached row left behind
after a wipe or by a worker that died."""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, TESTS, tiny_data

from shards import rowcache, training
from shards.job import StageRunner
from shards.rowcache import RowCache
from shards.spec import TrainSpec
from shards.storage import Storage
from shards.store import read_slice, write_partition


def spec(shape):
    return TrainSpec(seed=3, model="mlp", model_kwargs={"hidden": [8]}, optim={"lr": 0.05},
                     epochs_per_stage=(2, 2, 3), batch_size=16, input_shape=shape, num_classes=3)  # fmt: skip


def partition(tmp_path, n=240, drop=()):
    X, y, ids = tiny_data(n=n)
    keep = ~np.isin(ids, list(drop))
    store = Storage(str(tmp_path / "store"))
    return store, write_partition(store, ids[keep], X[keep], y[keep], "str", 1, 2, 3)[1]


def files_bytes(d):
    return b"".join(open(os.path.join(d, f), "rb").read() for f in os.listdir(d))


@pytest.mark.parametrize("memory", [rowcache.MEMORY_BYTES, 0], ids=["in-memory", "files"])
def test_checkpoints_equal_those_of_rows_in_memory(tmp_path, monkeypatch, memory):
    monkeypatch.setattr(rowcache, "MEMORY_BYTES", memory)
    store, entries = partition(tmp_path)
    runner, prev, in_memory = StageRunner(), None, None
    for stage in (1, 2, 3):
        entry, _ = runner.run(store, spec((6,)), 1, stage, entries, prev)
        rows = np.concatenate([read_slice(store, e) for e in entries[:stage]])
        in_memory, _ = training.run_stage(spec((6,)), 1, stage, in_memory, rows, "x")
        cached = training.load_checkpoint(store.read(entry["file"], entry["sha256"]))
        assert all(np.array_equal(cached["state_dict"][k], in_memory["state_dict"][k]) for k in cached["state_dict"])
        prev = entry
    runner.drop_cache()


def held_bytes(cache: RowCache) -> bytes:
    """Every raw byte the cache holds: its files, and its rows in memory."""
    mem = b"".join(a.tobytes() + b.tobytes() for parts in cache._memory.values() for a, b in parts)
    return files_bytes(cache.dir) + mem


@pytest.mark.parametrize("memory", [rowcache.MEMORY_BYTES, 0], ids=["in-memory", "files"])
def test_a_changed_slice_is_reread_and_wipe_leaves_no_row(tmp_path, monkeypatch, memory):
    monkeypatch.setattr(rowcache, "MEMORY_BYTES", memory)
    X, _, ids = tiny_data(n=240)
    store, entries = partition(tmp_path)
    cache = RowCache(str(tmp_path / "cache"))
    cache.rows(store, 1, entries)
    assert bool(os.listdir(cache.dir)) == (memory == 0), "a small shard stays in memory, unless none is allowed"
    gone = read_slice(store, entries[1])["id"][0]
    needle = X[ids == gone][0].tobytes()
    assert needle in held_bytes(cache)
    held = [a for parts in cache._memory.values() for pair in parts for a in pair]
    store2, after = partition(tmp_path / "b", drop=[gone])
    assert after[0] == entries[0] and after[1] != entries[1], "the row sits in slice 2"
    got = cache.rows(store2, 1, after)
    want = np.concatenate([read_slice(store2, e) for e in after])
    assert np.array_equal(got["x"], want["x"]) and np.array_equal(got["y"], want["y"])
    assert needle not in held_bytes(cache), "the erased row's features are gone from the cache"
    assert needle not in b"".join(a.tobytes() for a in held), "the dropped slice was zeroed, not only let go"
    assert len(cache.rows(store2, 1, after[:1])) == after[0]["rows"], "a shorter prefix"
    held = [a for parts in cache._memory.values() for pair in parts for a in pair]
    held += [a for pair in cache._joined.values() for a in pair]
    assert cache._joined or memory == 0, "several slices in memory are joined for a stage"
    cache.wipe()
    assert os.listdir(cache.dir) == [] and held_bytes(cache) == b""
    assert not any(a.any() for a in held), "rows held in memory, joined ones included, are zeroed by the wipe"


def test_a_shard_beyond_the_memory_budget_moves_to_files_with_the_same_rows(tmp_path, monkeypatch):
    store, entries = partition(tmp_path)
    first = read_slice(store, entries[0])
    monkeypatch.setattr(rowcache, "MEMORY_BYTES", first["x"].astype(np.float32).nbytes + 8 * len(first) + 1)
    cache = RowCache(str(tmp_path / "cache"))
    assert isinstance(cache.rows(store, 1, entries[:1])["x"], np.ndarray) and not os.listdir(cache.dir)
    moved = cache._memory[1][0][0]
    got = cache.rows(store, 1, entries)
    want = np.concatenate([read_slice(store, e) for e in entries])
    assert isinstance(got["x"], np.memmap) and 1 not in cache._memory
    assert np.array_equal(got["x"], want["x"]) and np.array_equal(got["y"], want["y"])
    assert not moved.any(), "the rows that moved to files are zeroed in memory"
    cache.wipe()


def test_a_dead_workers_cache_is_wiped(tmp_path):
    root = tmp_path / "cache"
    dead = root / "999999999-abc"  # no such pid
    dead.mkdir(parents=True)
    (dead / "shard-0.x").write_bytes(b"raw row bytes")
    RowCache(str(root))
    assert not dead.exists()


def test_the_cache_directory_goes_with_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(rowcache, "MEMORY_BYTES", 0)  # rows in files
    store, entries = partition(tmp_path)
    cache = RowCache(str(tmp_path / "cache"))
    cache.rows(store, 0, entries)
    d = cache.dir
    assert os.listdir(d)
    del cache
    assert not os.path.exists(d)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_DATA and /proc/self/status are Linux's")
def test_a_shard_larger_than_the_memory_allowed_trains(tmp_path):
    """tests/bigshard.py caps its data memory (RLIMIT_DATA) at less than half a 320 MiB shard: training
    from the memory-mapped cache finishes, while the same stage on a copy of the rows in memory fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    out = subprocess.run([sys.executable, str(TESTS / "bigshard.py"), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["memmap:", "trained", "copy:", "MemoryError"]


def test_a_runner_trains_another_width_after_its_run_ends(tmp_path):
    """The cache forgets a shard's width with its rows: the next ensemble on a warm worker may differ."""
    store, entries = partition(tmp_path)
    runner = StageRunner()
    runner.run(store, spec((6,)), 1, 1, entries, None)
    runner.finish()
    X, y, ids = tiny_data(n=240)
    wide = np.hstack([X, X[:, :4]])
    store2 = Storage(str(tmp_path / "store2"))
    entries2 = write_partition(store2, ids, wide, y, "str", 1, 2, 3)[1]
    entry, _ = runner.run(store2, spec((10,)), 1, 1, entries2, None)
    assert training.load_checkpoint(store2.read(entry["file"], entry["sha256"]))["rows"] == len(
        read_slice(store2, entries2[0])
    )
    runner.finish()
    assert os.listdir(runner._cache.dir) == []


@pytest.mark.parametrize("memory", [rowcache.MEMORY_BYTES, 0], ids=["in-memory", "files"])
def test_a_finishing_stage_syncs_its_checkpoints_with_the_cache_zeros_and_keeps_nothing(tmp_path, monkeypatch, memory):
    """``run(..., finish=True)``: the run's checkpoints and the zeroed cache files made durable by one sync
    (one filesystem: one syncfs), before the cache files are removed; no row and no state kept after. Rows
    held in memory need no sync: only the checkpoints are synced."""
    from shards import storage as storage_mod

    monkeypatch.setattr(rowcache, "MEMORY_BYTES", memory)
    store, entries = partition(tmp_path)
    runner = StageRunner()
    runner._cache = RowCache(str(tmp_path / "cache"))  # on the store's filesystem
    calls, real = [], storage_mod.sync_paths

    def recording(paths):
        calls.append((list(paths), sorted(os.listdir(runner._cache.dir))))
        real(paths)

    monkeypatch.setattr(storage_mod, "sync_paths", recording)
    first, _ = runner.run(store, spec((6,)), 1, 1, entries, None)
    assert calls == [] and runner.held()["state"] and runner.held()["cached_rows"] > 0
    second, _ = runner.run(store, spec((6,)), 1, 2, entries, first, finish=True)
    [(synced, cache_files)] = calls
    assert {store.path(first["file"]), store.path(second["file"])} <= set(synced)
    assert bool(cache_files) == (memory == 0)
    assert all(os.path.join(runner._cache.dir, f) in synced for f in cache_files)
    assert runner.held() == {"cache_files": 0, "cached_rows": 0, "state": False}


def test_a_stage_checkpoint_goes_to_disk_while_the_next_trains_and_finish_waits_for_it(tmp_path, monkeypatch):
    """Every checkpoint but the run's last is fsynced on a thread as soon as it is written; `finish` joins
    those threads before its one sync, so the run's checkpoints are durable when it returns."""
    import threading

    from shards import job

    store, entries = partition(tmp_path)
    flushed, release = [], threading.Event()

    def slow_fsync(paths):
        release.wait(10)
        flushed.extend(paths)

    monkeypatch.setattr(job, "_fsync_quietly", slow_fsync)
    runner = StageRunner()
    first, _ = runner.run(store, spec((6,)), 1, 1, entries, None)
    assert flushed == [] and any(t.name == "sisa-ckpt-flush" for t in threading.enumerate())
    threading.Timer(0.2, release.set).start()
    runner.run(store, spec((6,)), 1, 2, entries, first, finish=True)
    assert flushed == [store.path(first["file"])], "the first stage's file, flushed before finish returned"
    assert runner._flushing == []
