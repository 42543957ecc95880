"""After a deletion MLflow holds no model that saw the deleted rows: the superseded sub-models' weight bytes,
the rows' feature bytes and their raw ids are in no artifact and nowhere in the backend database file
(freed space included), while the run history stays."""

import os
import signal
import sqlite3

import numpy as np
from helpers import delete_killed_at, scan, tiny_config, tiny_data, weight_needles
from mlflow.tracking import MlflowClient

from sisa import SisaEnsemble
from sisa.ledger import Ledger
from sisa.tracking.pyfunc import fingerprint


def test_no_superseded_model_or_deleted_row_left_in_mlflow(tmp_path):
    X, y, ids = tiny_data(n=240)
    ids = ids.astype("<U32")
    marked = [7, 50, 51, 199]
    for k, r in enumerate(marked):
        X[r] = np.float32(41337.25 + k) + np.arange(X.shape[1], dtype=np.float32)
        ids[r] = f"SECRET-ML-{k}-zq"
    w = tmp_path / "w"
    ens = SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), w).fit(
        X, y, ids=ids, eval_set=(X[-40:], y[-40:])
    )
    del_ids = [ids[r] for r in marked]
    affected = sorted({ens.shard_of(i)[0] for i in del_ids})
    kept = [s for s in ens.active_shards() if s not in affected]
    old_weights = weight_needles(ens, affected)
    # the superseded version's identity, held by its model-version and logged-model rows in the database
    old_version = [fingerprint(ens._ctx, ens.manifest).encode()]
    rows = [X[r].tobytes() for r in marked] + [i.encode() for i in del_ids] + [i.encode("utf-32-le") for i in del_ids]
    ml = [w / "mlartifacts", w / "mlflow.db", w / "mlflow.db-wal"]  # the write-ahead log holds pages too

    def scan_mlflow(needles):
        return [hit for root in ml for hit in (scan(root, needles) if root.is_dir() else _scan_file(root, needles))]

    assert {n for _, n in scan_mlflow(old_weights)} == set(old_weights), "the scan sees the model before"
    assert {p for p, _ in scan_mlflow(old_version)} & {"mlflow.db", "mlflow.db-wal"}
    client = MlflowClient(f"sqlite:///{w / 'mlflow.db'}")
    runs_before = {
        r.info.run_id
        for r in client.search_runs([client.get_experiment_by_name(ens._ctx.tracker().experiment).experiment_id])
    }

    links = tmp_path / "links"  # a second name for every artifact file: the inodes the purge must zero
    links.mkdir()
    before = [f for f in sorted((w / "mlartifacts").rglob("*")) if f.is_file()]
    for k, f in enumerate(before):
        os.link(f, links / str(k))
    ens.delete(del_ids)
    ens.close()
    assert scan_mlflow(old_weights + old_version + rows) == []
    gone = [links / str(k) for k, f in enumerate(before) if not f.exists()]
    assert gone, "the superseded version's files were removed"
    live = {(st.st_dev, st.st_ino) for st in (f.stat() for f in (w / "mlartifacts").rglob("*") if f.is_file())}
    shared = [g for g in gone if (g.stat().st_dev, g.stat().st_ino) in live]
    assert {g.stat().st_ino for g in shared} == {_shard_file(w, s).stat().st_ino for s in kept}, (
        "only the unaffected shards' weights files are shared with the new version"
    )
    assert all(set(g.read_bytes()) <= {0} for g in gone if g not in shared), "the others zeroed, not only unlinked"
    db = sqlite3.connect(w / "mlflow.db")
    # no VACUUM: MLflow's connections zero what they delete (secure_delete), the purge empties the log
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert not (w / "mlflow.db-wal").exists() or (w / "mlflow.db-wal").stat().st_size == 0
    # the live model is there (the unaffected shards' weights are in it), and the run history stays
    assert {n for _, n in scan_mlflow(weight_needles(ens, kept + affected))} == set(
        weight_needles(ens, kept + affected)
    )
    exp = client.get_experiment_by_name(ens._ctx.tracker().experiment).experiment_id
    runs_after = client.search_runs([exp])
    assert runs_before < {r.info.run_id for r in runs_after}
    fit_run = next(
        r for r in runs_after if r.data.tags.get("sisa.operation") == "fit" and "mlflow.parentRunId" not in r.data.tags
    )
    assert "ensemble_accuracy" in fit_run.data.metrics


def _shard_file(w, s: int):
    """Shard ``s``'s weights file in the one live model version's artifacts."""
    (path,) = (w / "mlartifacts").rglob(f"data/ensemble/shards/{s}.pt")
    return path


def _scan_file(path, needles):
    data = path.read_bytes() if path.exists() else b""
    return [(path.name, n) for n in needles if n in data]


def test_a_purge_killed_before_the_log_is_emptied_is_finished_on_open(tmp_path):
    """The deleted rows' pages are zeroed in the write-ahead log, but the log still holds their earlier
    images until it is emptied: a process killed in between leaves them, and the next open finishes it."""
    X, y, ids = tiny_data(n=150)
    w = tmp_path / "w"
    ens = SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), w).fit(X, y, ids=ids)
    old = [fingerprint(ens._ctx, ens.manifest).encode()]
    ens.close()
    res = delete_killed_at(w, ["u-9"], "before_mlflow_log_emptied")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert [r["state"] for r in Ledger(w / "ledger.db").requests()] == ["effective"]
    assert _scan_file(w / "mlflow.db-wal", old) or _scan_file(w / "mlflow.db", old), "killed with the old pages"
    SisaEnsemble.open(w, executor="inprocess").close()
    assert [r["state"] for r in Ledger(w / "ledger.db").requests()] == ["done"]
    assert _scan_file(w / "mlflow.db", old) == [] and _scan_file(w / "mlflow.db-wal", old) == []
