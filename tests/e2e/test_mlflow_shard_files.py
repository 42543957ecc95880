"""A published version holds one weights file per shard: a deletion's publish writes only the retrained
shards' files and hard-links the others from the version it supersedes (same inode, nothing rewritten),
the purge zeroes every superseded file but those the new version shares, a changed byte in a shared file
still fails the load and is never linked into a later version, and a publish killed after writing its
model is finished on reopen without zeroing the live version's files."""

import os
import signal

import mlflow.pyfunc
import numpy as np
import pytest
from helpers import delete_killed_at, scan, tiny_config, tiny_data, weight_needles
from mlflow.tracking import MlflowClient

from shards.errors import IntegrityError
from sisa import SisaEnsemble
from sisa.tracking.pyfunc import load_model


def _world(tmp_path, monkeypatch):
    X, y, ids = tiny_data(n=180)
    w = tmp_path / "w"
    ens = SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), w).fit(X, y, ids=ids)
    uri = f"sqlite:///{w / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    return ens, X, w, uri


def _shard_files(w) -> dict:
    """{(model folder, shard): weights file} of every model version's artifacts in the workdir."""
    out = {}
    for f in (w / "mlartifacts").rglob("data/ensemble/shards/*.pt"):
        out[(f.parents[4].name, int(f.stem))] = f
    return out


def _inode(path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _zeroed(path) -> bool:
    return set(path.read_bytes()) <= {0}


def _keep_links(w, tmp_path) -> dict:
    """A second name for every shard file now: what the purge did to each inode shows through it."""
    (tmp_path / "links").mkdir()
    out = {}
    for (_, s), f in _shard_files(w).items():
        os.link(f, tmp_path / "links" / f"{s}.pt")
        out[s] = tmp_path / "links" / f"{s}.pt"
    return out


def test_a_deletion_rewrites_only_the_retrained_shards_and_zeroes_their_old_files(tmp_path, monkeypatch):
    ens, X, w, uri = _world(tmp_path, monkeypatch)
    (old_model,) = {m for m, _ in _shard_files(w)}
    links = _keep_links(w, tmp_path)
    gone = ["u-3", "u-4"]
    hit = sorted({ens.shard_of(i)[0] for i in gone})
    kept = [s for s in ens.active_shards() if s not in hit]
    assert hit and kept
    old_needles = weight_needles(ens, hit)

    ens.delete(gone)
    files = _shard_files(w)
    (new_model,) = {m for m, _ in files}
    assert new_model != old_model and not (w / "mlartifacts" / "models" / old_model).exists()
    for s in kept:  # the same inode: not written, copied or hashed again
        assert _inode(files[(new_model, s)]) == _inode(links[s]) and not _zeroed(links[s])
    for s in hit:  # the superseded file of a retrained shard: zeroed, and not what the new version holds
        assert _inode(files[(new_model, s)]) != _inode(links[s]) and _zeroed(links[s])
    assert scan(w / "mlartifacts", old_needles) == []
    name = ens._ctx.tracker().model_name
    model = load_model(f"models:/{name}@current", uri)
    assert np.array_equal(model.predict(X, params={"proba": True}), ens.predict_proba(X))

    # a changed byte in a shared file fails the load of the version that links it
    shared = files[(new_model, kept[0])]
    data = bytearray(shared.read_bytes())
    data[-40] ^= 0x01
    shared.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"shards/{kept[0]}\.pt: sha256 differs from the published digest"):
        load_model(f"models:/{name}@current", uri)
    with pytest.raises(IntegrityError, match=rf"shards/{kept[0]}\.pt: its sha256 is not the one recorded"):
        mlflow.pyfunc.load_model(f"models:/{name}@current")


def test_a_tampered_kept_shard_file_is_written_afresh_not_linked_into_the_next_version(tmp_path, monkeypatch):
    ens, X, w, uri = _world(tmp_path, monkeypatch)
    gone = ["u-3"]
    hit = ens.shard_of(gone[0])[0]
    kept = next(s for s in ens.active_shards() if s != hit)
    links = _keep_links(w, tmp_path)
    data = bytearray(links[kept].read_bytes())
    data[-40] ^= 0x01
    links[kept].write_bytes(bytes(data))  # the live version's file of a shard the deletion does not touch
    tampered = _inode(links[kept])

    receipt = ens.delete(gone, wait="done")
    assert receipt.timing["state"] == "done"
    files = _shard_files(w)
    assert tampered not in {_inode(f) for f in files.values()}, "the changed file was linked into the new version"
    assert _zeroed(links[kept]), "the planted bytes outlived the purge"
    assert _inode(files[next(m for m, _ in files), hit]) != _inode(links[hit])
    model = load_model(f"models:/{ens._ctx.tracker().model_name}@current", uri)
    assert np.array_equal(model.predict(X, params={"proba": True}), ens.predict_proba(X))


@pytest.mark.slow
def test_a_publish_killed_after_writing_its_model_is_finished_on_reopen(tmp_path, monkeypatch):
    ens, X, w, uri = _world(tmp_path, monkeypatch)
    links = _keep_links(w, tmp_path)
    gone = ["u-9"]
    hit = sorted({ens.shard_of(i)[0] for i in gone})
    old_needles = weight_needles(ens, hit)
    ens.close()
    res = delete_killed_at(w, gone, "after_model_written")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert len({m for m, _ in _shard_files(w)}) == 2, "killed with an unregistered model beside the live one"

    reopened = SisaEnsemble.open(w, executor="inprocess")  # settles the request: publish and purge again
    files = _shard_files(w)
    assert len({m for m, _ in files}) == 1
    assert all(_zeroed(links[s]) for s in hit) and scan(w / "mlartifacts", old_needles) == []
    assert all(not _zeroed(f) for f in files.values())
    name = reopened._ctx.tracker().model_name
    assert [str(v.version) for v in MlflowClient(uri).search_model_versions(f"name = '{name}'")] == ["2"]
    model = load_model(f"models:/{name}@current", uri)
    assert np.array_equal(model.predict(X, params={"proba": True}), reopened.predict_proba(X))
