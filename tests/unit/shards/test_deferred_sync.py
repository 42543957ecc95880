"""Slices and stage checkpoints are written without their own fsyncs and made durable together: every file
a fit's manifest names went through one sync before the manifest was written, and the sync falls back to
an fsync per file and directory where the platform has no syncfs."""

import os

from helpers import tiny_config, tiny_data

from shards import storage as storage_mod
from sisa import SisaEnsemble


def test_every_file_the_manifest_names_was_synced_before_the_manifest_was_written(tmp_path, monkeypatch):
    synced, real = [], storage_mod.sync_paths
    wd = tmp_path / "w"

    def recording(paths):
        assert not (wd / "manifest.json").exists(), "synced after the manifest was written"
        synced.extend(os.path.realpath(p) for p in paths)
        real(paths)

    monkeypatch.setattr(storage_mod, "sync_paths", recording)
    X, y, ids = tiny_data(n=120)
    ens = SisaEnsemble.from_config(tiny_config(sharding={"shards": 2, "slices": 2}), wd).fit(X, y, ids=ids)
    store = ens.storage()
    named = [e.file for sh in ens.manifest.shards for e in (*sh.slices, *sh.checkpoints)]
    assert len(named) == 2 * 2 + 2 * 2
    missing = [f for f in named if os.path.realpath(store.path(f)) not in synced]
    assert not missing, f"never synced: {missing}"


def test_without_syncfs_every_file_and_directory_is_fsynced(tmp_path, monkeypatch):
    paths = []
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for i in range(2):
            p = tmp_path / d / f"f{i}"
            p.write_bytes(b"x")
            paths.append(str(p))
    fsynced = []
    real = os.fsync
    monkeypatch.setattr(storage_mod, "_libc", lambda: None)
    monkeypatch.setattr(os, "fsync", lambda fd: fsynced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    storage_mod.sync_paths(paths)
    assert sorted(fsynced) == sorted(paths + [str(tmp_path / "a"), str(tmp_path / "b")])


def test_a_purge_zeroes_every_file_and_syncs_the_zeros_before_it_removes_any(tmp_path, monkeypatch):
    from shards.storage import Storage

    store = Storage(str(tmp_path / "store"))
    rels = [f"ckpt/{i}.ckpt" for i in range(3)]
    links = []
    for k, rel in enumerate(rels):
        store.write(rel, bytes([7 + k]) * 5000)
        links.append(tmp_path / f"link{k}")
        os.link(store.path(rel), links[-1])  # a second name: what the purge did to the bytes shows through it
    events, real = [], storage_mod.sync_paths

    def recording(paths):
        assert all(os.path.exists(p) for p in paths), "a file was removed before the zeros were durable"
        assert all(set(link.read_bytes()) == {0} for link in links), "synced before every file was zeroed"
        events.append(sorted(os.path.realpath(p) for p in paths))
        real(paths)

    monkeypatch.setattr(storage_mod, "sync_paths", recording)
    removed = []
    store.delete_many([*rels, "ckpt/missing.ckpt"], on_delete=lambda: removed.append(len(store.listdir("ckpt"))))
    assert events == [sorted(os.path.realpath(store.path(r)) for r in rels)], "one sync for all"
    assert removed == [2, 1, 0] and store.listdir("ckpt") == []
    assert all(link.stat().st_size == 5000 and set(link.read_bytes()) == {0} for link in links)
