"""A settled batch of deletions is one MLflow run (its children: the retrained shards), and a process
killed while logging it loses nothing: the next open closes the dead run as KILLED and logs the batch. A
batch of any length fits MLflow's limit on a tag value (its ids beyond it: in an artifact), and a batch
whose run could not be created is done (every copy purged), its run owed until a later settle logs it."""

import json
import signal
import warnings
from pathlib import Path

from helpers import delete_killed_at, tiny_config, tiny_data
from mlflow.tracking import MlflowClient

from sisa import SisaEnsemble
from sisa.ledger import Ledger
from sisa.ops import owed
from sisa.tracking.pyfunc import fingerprint
from sisa.tracking.runs import REQUEST_IDS, REQUEST_IDS_FILE, REQUESTS, TAG_LIMIT

_create_run = MlflowClient.create_run


def _sql_tag_column(self, experiment_id, start_time=None, tags=None, run_name=None):
    """create_run as a Postgres or MySQL store does it: a tag value over 8,000 characters fails the insert
    (sqlite does not check)."""
    if any(len(str(v)) > TAG_LIMIT for v in (tags or {}).values()):
        raise RuntimeError("(emulated) value too long for type character varying(8000)")
    return _create_run(self, experiment_id, start_time=start_time, tags=tags, run_name=run_name)


def _parents(client, exp) -> list:
    runs = client.search_runs([exp], "tags.`sisa.operation` = 'delete'")
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def test_a_batch_run_killed_midway_is_closed_and_logged_again_on_open(tmp_path):
    X, y, ids = tiny_data(n=180)
    w = tmp_path / "w"
    ens = SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), w).fit(X, y, ids=ids)
    queued = [ens.delete([i], wait="effective").request_id for i in ("u-5", "u-6")]
    ens.close()
    res = delete_killed_at(w, ["u-7"], "batch_run_started")  # the open settles the queue first, and dies
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    led = Ledger(w / "ledger.db")
    assert [(r["id"], r["state"]) for r in led.requests()] == [(rid, "effective") for rid in queued]

    SisaEnsemble.open(w, executor="inprocess").close()
    assert [r["state"] for r in led.requests()] == ["done"] * 2
    client = MlflowClient(f"sqlite:///{w / 'mlflow.db'}")
    exp = client.get_experiment_by_name(ens._ctx.tracker().experiment).experiment_id
    parents = [
        r
        for r in client.search_runs([exp], "tags.`sisa.operation` = 'delete'")
        if "mlflow.parentRunId" not in r.data.tags
    ]
    by_status = {r.info.status: r for r in parents}
    assert sorted(by_status) == ["FINISHED", "KILLED"] and len(parents) == 2
    for r in parents:
        assert r.data.tags["sisa.request_ids"] == ",".join(queued)
    assert "The process died here" in by_status["KILLED"].data.tags["mlflow.note.content"]
    assert by_status["FINISHED"].data.metrics["requests"] == 2


def test_a_batch_of_400_requests_fits_the_tag_limit_and_lists_every_id_in_an_artifact(tmp_path, monkeypatch):
    X, y, ids = tiny_data(n=150)
    ens = SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), tmp_path / "w").fit(X, y, ids=ids)
    monkeypatch.setattr(MlflowClient, "create_run", _sql_tag_column)
    rids = [f"20261130T120000-{i:08x}" for i in range(400)]  # 9,599 characters joined
    recs = [
        {"request_id": r, "plans": [], "stages": {}, "metrics": {"rows_deleted": 1}, "tags": {}, "slices_hit": []}
        for r in rids
    ]
    tracker, m = ens._ctx.tracker(), ens.manifest
    _, dead = tracker.start_run("delete", m, {REQUEST_IDS: ",".join(rids)})  # an attempt that died logging
    owed.open_batch(ens._ctx, m, recs)  # closes the dead run (its ids: the first ones)
    run_id = owed.close_batch(ens._ctx, m, recs, {})

    client = MlflowClient(tracker.uri)
    for r in (client.get_run(dead), client.get_run(run_id)):
        tag = r.data.tags[REQUEST_IDS]
        assert len(tag) <= TAG_LIMIT and rids[: len(tag.split(","))] == tag.split(",")
        assert 300 < len(tag.split(",")) < 400 and r.data.tags[REQUESTS] == "400"
        listed = json.loads(Path(client.download_artifacts(r.info.run_id, REQUEST_IDS_FILE, str(tmp_path))).read_text())
        assert listed == {"request_ids": rids}
    assert client.get_run(dead).info.status == "KILLED" and client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.metrics["requests"] == 400


def test_a_batch_whose_run_is_not_created_is_done_and_its_run_logged_by_a_later_settle(tmp_path, monkeypatch):
    X, y, ids = tiny_data(n=150)
    w = tmp_path / "w"
    ens = SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), w).fit(X, y, ids=ids)
    queued = [ens.delete([i], wait="effective").request_id for i in ("u-5", "u-6")]

    def refused(self, *a, **k):
        raise RuntimeError("(emulated) the tracking server refused the run")

    monkeypatch.setattr(MlflowClient, "create_run", refused)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        receipt = ens.delete(["u-7"], wait="done")
    assert receipt.timing["state"] == "done"  # every copy purged; the run is owed behind that moment
    assert any("run of 3 deletion request(s) is still owed" in str(x.message) for x in seen), [
        str(x.message) for x in seen
    ]
    led = Ledger(w / "ledger.db")
    queued.append(receipt.request_id)
    assert [(r["id"], r["state"]) for r in led.requests()] == [(rid, "done") for rid in queued]
    assert sorted(p.stem for p in (w / "owed").iterdir()) == sorted(queued)
    tracker = ens._ctx.tracker()
    client = MlflowClient(tracker.uri)
    (live,) = client.search_model_versions(f"name = '{tracker.model_name}'")  # published and purged all the same
    assert live.tags["sisa.fingerprint"] == fingerprint(ens._ctx, ens.manifest)
    exp = tracker.experiment_id()
    assert _parents(client, exp) == []

    monkeypatch.setattr(MlflowClient, "create_run", _create_run)
    assert ens.settle() == []  # nothing left to make done: the owed run is logged
    assert [r["state"] for r in led.requests()] == ["done"] * 3 and list((w / "owed").iterdir()) == []
    (run,) = _parents(client, exp)
    assert run.info.status == "FINISHED" and run.data.tags[REQUEST_IDS] == ",".join(queued)
    assert run.data.metrics["requests"] == 3
