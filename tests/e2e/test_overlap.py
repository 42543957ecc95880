"""A ``wait="done"`` deletion with tracking on prepares its done path while its shards retrain
(`sisa.ops.overlap`): its batch run and the next model version, which it finishes beside the evaluation
once the request is effective. What it leaves is what the plain path leaves, a kill inside it is finished
on open, and a failure inside it falls back to the plain path."""

import signal
import sqlite3
import sys
import warnings

import mlflow
import numpy as np
import pytest
from helpers import delete_killed_at, tiny_config, tiny_data, weights_equal
from mlflow.tracking import MlflowClient

from sisa import SisaEnsemble
from sisa.context import OpContext
from sisa.ledger import Ledger
from sisa.tracking import registry
from sisa.tracking import runs as runs_module
from sisa.tracking.pyfunc import load_model

GONE = ["u-3", "u-50", "u-77"]


def _fit(w, executor="inprocess"):
    X, y, ids = tiny_data(n=240)
    cfg = tiny_config(tracking={"enabled": True}, cluster={"executor": executor})
    ens = SisaEnsemble.from_config(cfg, w).fit(X[:200], y[:200], ids=ids[:200], eval_set=(X[200:], y[200:]))
    return ens, X


def _runs(w, ens):
    client = MlflowClient(f"sqlite:///{w / 'mlflow.db'}")
    exp = client.get_experiment_by_name(ens._ctx.tracker().experiment).experiment_id
    runs = client.search_runs([exp], "tags.`sisa.operation` = 'delete'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return client, runs, parents


def _tracking_down_at_finish(monkeypatch):
    """MLflow refuses a run's last calls (its metrics and its end): returns the real `finished`."""
    from sisa.tracking.runs import MLflowObserver

    finished = MLflowObserver.finished

    def down(self, *a, **k):
        self._op = None
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(MLflowObserver, "finished", down)
    return finished


def _children(runs, parent):
    return {
        int(r.data.tags["sisa.shard"]): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }


def test_on_ray_the_done_path_prepared_ahead_leaves_what_the_plain_path_leaves(tmp_path, ray_session):
    a, X = _fit(tmp_path / "a", "ray")
    b, _ = _fit(tmp_path / "b", "ray")
    seen = []
    receipt = a.delete(GONE, progress=lambda plan, entry, metrics: seen.append(entry["stage"]))
    assert receipt.timing["state"] == "done"
    b.delete(GONE, wait="effective")  # nothing ahead: the bookkeeping is done by settle, the plain way
    assert b.settle() and weights_equal(a, b)

    # the evaluation beside the publish is the plain one, and a fresh one, bit for bit
    for key in ("ensemble_accuracy", "shard_accuracy"):
        assert a.manifest.metrics[key] == b.manifest.metrics[key]
    fresh = OpContext(a._ctx.config, a._ctx.workdir, a._ctx.commit, executor="inprocess")
    assert fresh.evaluate(a.manifest)["ensemble_accuracy"] == a.manifest.metrics["ensemble_accuracy"]

    # one run, started ahead and finished, with everything the plain path logs
    client, runs_a, (pa,) = _runs(tmp_path / "a", a)
    _, runs_b, (pb,) = _runs(tmp_path / "b", b)
    assert pa.info.status == "FINISHED" and "RUNNING" not in {r.info.status for r in runs_a}
    ca, cb = _children(runs_a, pa), _children(runs_b, pb)
    assert sorted(ca) == sorted(cb) == sorted(int(s) for s in receipt.shards)
    for s in ca:
        assert set(ca[s].data.metrics) == set(cb[s].data.metrics)
        for k in ("test_accuracy", "stage_rows", "stage_loss", "sample_epochs"):
            assert ca[s].data.metrics[k] == cb[s].data.metrics[k], (s, k)
        assert ca[s].data.metrics["test_accuracy"] == a.manifest.metrics["shard_accuracy"][str(s)]
    for k in ("ensemble_accuracy", "rows_deleted", "sample_epochs", "shards_retrained"):
        assert pa.data.metrics[k] == pb.data.metrics[k]

    # one registered version: the new one, linking the untouched shards, loading like the ensemble
    name = a._ctx.tracker().model_name
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["2"]
    model = load_model(f"models:/{name}@current", f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    assert np.array_equal(model.predict(X, params={"proba": True}), a.predict_proba(X))
    wal = tmp_path / "a" / "mlflow.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0, "the run logged last, then the log emptied"
    db = sqlite3.connect(tmp_path / "a" / "mlflow.db")
    assert db.execute("select count(*) from logged_models").fetchone()[0] == 1
    db.close()


def test_a_kill_while_the_done_path_is_prepared_is_finished_on_open(tmp_path):
    ens, X = _fit(tmp_path / "w")
    name = ens._ctx.tracker().model_name
    ens.close()
    res = delete_killed_at(tmp_path / "w", GONE, "batch_run_started")  # on the background thread
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    (req,) = Ledger(tmp_path / "w" / "ledger.db").requests()
    assert req["state"] in ("pending", "effective")  # the tiny retrain may end before the thread starts its run

    reopened = SisaEnsemble.open(tmp_path / "w", executor="inprocess")
    assert [r["state"] for r in Ledger(tmp_path / "w" / "ledger.db").requests()] == ["done"]
    client, runs, parents = _runs(tmp_path / "w", reopened)
    by_status = {r.info.status: r for r in parents}  # the dead attempt's run closed, the re-run's finished
    assert sorted(by_status) == ["FINISHED", "KILLED"] and len(parents) == 2
    assert "The process died here" in by_status["KILLED"].data.tags["mlflow.note.content"]
    assert {r.data.tags["sisa.request_id"] for r in parents} == {
        Ledger(tmp_path / "w" / "ledger.db").requests()[0]["id"]
    }
    assert "RUNNING" not in {r.info.status for r in runs}
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["2"]
    model = load_model(f"models:/{name}@current", f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    assert np.array_equal(model.predict(X, params={"proba": True}), reopened.predict_proba(X))


def test_a_kill_after_done_leaves_the_run_owed_and_the_next_open_logs_it(tmp_path):
    ens, X = _fit(tmp_path / "w")
    name = ens._ctx.tracker().model_name
    ens.close()
    res = delete_killed_at(tmp_path / "w", GONE, "after_done")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    led = Ledger(tmp_path / "w" / "ledger.db")
    (req,) = led.requests()
    assert req["state"] == "done" and [p.stem for p in (tmp_path / "w" / "owed").iterdir()] == [req["id"]]
    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["2"]  # purged: done

    reopened = SisaEnsemble.open(tmp_path / "w", executor="inprocess")
    assert not list((tmp_path / "w" / "owed").iterdir())
    _, runs, parents = _runs(tmp_path / "w", reopened)
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"] and "RUNNING" not in {
        r.info.status for r in runs
    }
    assert [r for r in parents if r.info.status == "FINISHED"][0].data.metrics["rows_deleted"] == 3


def test_a_staging_failure_falls_back_to_the_plain_publish(tmp_path, monkeypatch):
    ens, X = _fit(tmp_path / "w")
    ref, _ = _fit(tmp_path / "ref")

    def broken(*a, **k):
        raise RuntimeError("artifact store unreachable")

    monkeypatch.setattr(registry, "stage", broken)
    with pytest.warns(UserWarning, match="staged model version could not be prepared ahead.*unreachable"):
        receipt = ens.delete(GONE)
    assert receipt.timing["state"] == "done"
    ref.delete(GONE, wait="effective")
    ref.settle()
    assert weights_equal(ens, ref)
    client, runs, (parent,) = _runs(tmp_path / "w", ens)
    assert parent.info.status == "FINISHED"
    name = ens._ctx.tracker().model_name
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["2"]
    model = load_model(f"models:/{name}@current", f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    assert np.array_equal(model.predict(X, params={"proba": True}), ens.predict_proba(X))


def test_a_deletion_that_fails_marks_its_run_failed_and_is_finished_on_open(tmp_path, monkeypatch):
    ens, X = _fit(tmp_path / "w")

    def dies(self, *a, **k):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(OpContext, "run_plans", dies)
    from sisa.ops import overlap

    switch = sys.getswitchinterval()
    overlap._short_switch(+1)  # another deletion's overlap, still running
    try:
        with pytest.raises(RuntimeError, match="worker lost"):
            ens.delete(GONE)
        assert sys.getswitchinterval() == overlap.SWITCH, "aborted, then closed: one release, not two"
    finally:
        overlap._short_switch(-1)
    assert sys.getswitchinterval() == switch
    _, runs, (parent,) = _runs(tmp_path / "w", ens)
    assert parent.info.status == "FAILED" and "RUNNING" not in {r.info.status for r in runs}
    ens.close()
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left half-done that warns on open
        reopened = SisaEnsemble.open(tmp_path / "w", executor="inprocess")
    assert [r["state"] for r in Ledger(tmp_path / "w" / "ledger.db").requests()] == ["done"]
    uri = f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}"
    model = load_model(f"models:/{reopened._ctx.tracker().model_name}@current", uri)
    assert np.array_equal(model.predict(X, params={"proba": True}), reopened.predict_proba(X))
    assert mlflow.get_tracking_uri()  # the global URI is not ours to change


def test_a_run_whose_logging_fails_is_owed_after_done_and_logged_by_the_next_settle(tmp_path, monkeypatch):
    ens, X = _fit(tmp_path / "w")
    finished = _tracking_down_at_finish(monkeypatch)
    with pytest.warns(RuntimeWarning, match="run of 1 deletion request.*still owed.*the requests are done"):
        receipt = ens.delete(GONE)
    # done: every copy is purged; the run, behind that moment, is owed (durably) and not lost
    assert receipt.timing["state"] == "done" and receipt.timing["seconds_to_logged"] > receipt.timing["seconds_to_done"]
    led = Ledger(tmp_path / "w" / "ledger.db")
    assert [r["state"] for r in led.requests()] == ["done"]
    assert [p.stem for p in (tmp_path / "w" / "owed").iterdir()] == [receipt.request_id]
    name = ens._ctx.tracker().model_name
    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["2"]
    monkeypatch.setattr(runs_module.MLflowObserver, "finished", finished)
    ens.close()
    reopened = SisaEnsemble.open(tmp_path / "w", executor="inprocess")  # logs what is owed
    assert not list((tmp_path / "w" / "owed").iterdir())
    _, runs, parents = _runs(tmp_path / "w", reopened)
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"]
    assert "RUNNING" not in {r.info.status for r in runs}
    (logged,) = [r for r in parents if r.info.status == "FINISHED"]
    assert logged.data.metrics["rows_deleted"] == 3 and "ensemble_accuracy" in logged.data.metrics


def test_a_staged_link_changed_during_the_retrain_is_written_afresh(tmp_path, monkeypatch):
    from sisa.tracking import pyfunc

    ens, X = _fit(tmp_path / "w")
    planted = []
    link_shards = pyfunc.link_shards

    def plant(directory, reuse, checkpoints):  # a byte flipped in a staged file before the publish ends
        present = link_shards(directory, reuse, checkpoints)
        s = sorted(present)[0]
        f = directory / f"shards/{s}.pt"
        data = bytearray(f.read_bytes())
        data[-40] ^= 0x01
        f.write_bytes(bytes(data))
        planted.append(f.stat().st_ino)
        return present

    monkeypatch.setattr(registry, "link_shards", plant)
    assert ens.delete(GONE).timing["state"] == "done" and planted
    name = ens._ctx.tracker().model_name
    model = load_model(f"models:/{name}@current", f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    assert np.array_equal(model.predict(X, params={"proba": True}), ens.predict_proba(X))
    live = {f.stat().st_ino for f in (tmp_path / "w" / "mlartifacts").rglob("*.pt")}
    assert planted[0] not in live, "the changed file is not in the new version"


def test_overlapping_deletions_restore_the_switch_interval():
    import sys

    from sisa.ops import overlap

    before = sys.getswitchinterval()
    overlap._short_switch(+1)
    overlap._short_switch(+1)
    assert sys.getswitchinterval() == overlap.SWITCH
    overlap._short_switch(-1)
    assert sys.getswitchinterval() == overlap.SWITCH, "the other one still runs"
    overlap._short_switch(-1)
    assert sys.getswitchinterval() == before


def test_a_kill_after_the_run_is_logged_leaves_a_record_the_next_open_only_removes(tmp_path, monkeypatch):
    ens, X = _fit(tmp_path / "w")
    ens.close()
    res = delete_killed_at(tmp_path / "w", GONE, "before_owed_removed")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert len(list((tmp_path / "w" / "owed").iterdir())) == 1
    from sisa.ops import purge

    evaluations = []
    monkeypatch.setattr(OpContext, "evaluate", lambda self, m: evaluations.append(1) or {})
    SisaEnsemble.open(tmp_path / "w", executor="inprocess").close()
    assert not list((tmp_path / "w" / "owed").iterdir()) and evaluations == [], "removed, nothing done again"
    assert purge.settle(SisaEnsemble.open(tmp_path / "w", executor="inprocess")._ctx) == []
    _, runs, parents = _runs(tmp_path / "w", ens)
    assert [r.info.status for r in parents] == ["FINISHED"], "logged once"


def test_a_run_owed_from_an_earlier_request_joins_the_next_batch_started_ahead(tmp_path, monkeypatch):
    ens, X = _fit(tmp_path / "w")
    finished = _tracking_down_at_finish(monkeypatch)
    with pytest.warns(RuntimeWarning, match="still owed"):
        first = ens.delete(["u-3"])
    monkeypatch.setattr(runs_module.MLflowObserver, "finished", finished)
    second = ens.delete(["u-50"])  # its run, started ahead, names both and is adopted
    assert not list((tmp_path / "w" / "owed").iterdir())
    _, runs, parents = _runs(tmp_path / "w", ens)
    assert "RUNNING" not in {r.info.status for r in runs}
    (batch,) = [r for r in parents if r.info.status == "FINISHED"]
    assert batch.data.tags["sisa.request_ids"] == f"{second.request_id},{first.request_id}"
    # only the first request's own run, which could not be finished, is closed; the one started ahead is kept
    assert [r.data.tags.get("sisa.request_id") for r in parents if r.info.status == "KILLED"] == [first.request_id]
