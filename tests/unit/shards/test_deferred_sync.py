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
