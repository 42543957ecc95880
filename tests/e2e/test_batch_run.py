"""A settled batch of deletions is one MLflow run (its children: the retrained shards), and a process
killed while logging it loses nothing: the next open closes the dead run as KILLED and logs the batch."""

import signal

from helpers import delete_killed_at, tiny_config, tiny_data
from mlflow.tracking import MlflowClient

from sisa import SisaEnsemble
from sisa.ledger import Ledger


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
