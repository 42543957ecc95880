"""Two moments of a deletion: *effective* (the retrained models serve, the store holds no erased byte) and
*done* (re-evaluation, the MLflow run, publish and the purge of every model version that saw the rows).
Owed bookkeeping is batched, durable across a process exit, and the incremental evaluation is exact."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO, scan, tiny_config, tiny_data, weight_needles, weights_equal
from mlflow.tracking import MlflowClient

from sisa import SisaEnsemble
from sisa.aggregate import Aggregator, decide
from sisa.errors import ConfigError
from sisa.ledger import Ledger


def _marked(n=240):
    X, y, ids = tiny_data(n=n)
    ids = ids.astype("<U32")
    marked = [7, 50, 199]
    for k, r in enumerate(marked):
        X[r] = np.float32(51234.5 + k) + np.arange(X.shape[1], dtype=np.float32)
        ids[r] = f"GONE-{k}-xy"
    gone = [ids[r] for r in marked]
    needles = [X[r].tobytes() for r in marked] + [i.encode("utf-32-le") for i in gone] + [i.encode() for i in gone]
    return X, y, ids, gone, needles


def _versions(client, name):
    return sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))


def test_effective_serves_new_models_with_a_clean_store_and_done_purges_mlflow(tmp_path):
    X, y, ids, gone, needles = _marked()
    cfg = tiny_config(tracking={"enabled": True})
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w").fit(X, y, ids=ids)
    keep = ~np.isin(ids, gone)
    ref = SisaEnsemble.from_config(tiny_config(), tmp_path / "ref").fit(X[keep], y[keep], ids=ids[keep])
    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    name = ens._ctx.tracker().model_name
    v1 = _versions(client, name)
    affected = sorted({ens.shard_of(i)[0] for i in gone})
    old_weights = weight_needles(ens, affected)

    with pytest.raises(ConfigError, match="use 'effective' or 'done'"):
        ens.delete(gone, wait="soon")
    r = ens.delete(gone, wait="effective")
    assert r.timing["state"] == "effective" and r.timing["effective_at"] >= r.created
    assert "done_at" not in r.timing and r.timing["phase_seconds"]["swap"] >= 0
    led = Ledger(tmp_path / "w" / "ledger.db")
    assert led.state(r.request_id) == "effective"
    # effective: the new models serve (in this process and in a fresh one), the store holds no erased byte
    assert weights_equal(ens, ref) and np.array_equal(ens.predict_proba(X), ref.predict_proba(X))
    other = SisaEnsemble.open(tmp_path / "w", recover=False)
    assert np.array_equal(other.predict_proba(X), ref.predict_proba(X))
    assert scan(tmp_path / "w" / "store", needles + old_weights) == []
    assert scan(tmp_path / "w" / "owed", needles) == [] and (tmp_path / "w" / "owed").is_dir()
    # not done: MLflow still holds the version that saw the rows
    assert _versions(client, name) == v1

    assert ens.settle() == [r.request_id]
    assert led.state(r.request_id) == "done" and led.unfinished() == []
    assert list((tmp_path / "w" / "owed").iterdir()) == []
    now = _versions(client, name)
    assert len(now) == 1 and now != v1
    assert scan(tmp_path / "w" / "mlartifacts", old_weights) == []
    exp = client.get_experiment_by_name(ens._ctx.tracker().experiment).experiment_id
    runs = client.search_runs([exp], f"tags.`sisa.request_id` = '{r.request_id}'")
    parent = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert [x.info.status for x in parent] == ["FINISHED"]
    assert parent[0].data.metrics["rows_deleted"] == 3 and "phase_seconds/swap" in parent[0].data.metrics
    assert client.list_artifacts(parent[0].info.run_id, "plots") == [], "tracking.deletion_plots is off by default"
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    assert sorted(int(c.data.tags["sisa.shard"]) for c in children) == sorted(r.shards)
    assert all("stage_seconds" in c.data.metrics for c in children), "the stage figures, kept until logged"


def test_a_queue_of_effective_deletions_is_settled_in_one_batch(tmp_path):
    X, y, ids, gone, _ = _marked()
    ens = SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), tmp_path / "w").fit(X, y, ids=ids)
    first = ens.delete(gone[:1], wait="effective")
    second = ens.delete(gone[1:], wait="effective")  # the first one's bookkeeping is not paid in front of it
    led = Ledger(tmp_path / "w" / "ledger.db")
    assert [q["state"] for q in led.requests()] == ["effective", "effective"]
    third = ens.delete(["u-3"])  # wait="done": settles the whole queue, itself included
    assert third.timing["state"] == "done" and third.timing["done_at"] >= third.timing["effective_at"]
    assert [q["state"] for q in led.requests()] == ["done"] * 3
    assert [q["receipt"]["request_id"] for q in led.requests()] == [
        first.request_id,
        second.request_id,
        third.request_id,
    ]
    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    assert len(_versions(client, ens._ctx.tracker().model_name)) == 1
    exp = client.get_experiment_by_name(ens._ctx.tracker().experiment).experiment_id
    parents = [
        x
        for x in client.search_runs([exp], "tags.`sisa.operation` = 'delete'")
        if "mlflow.parentRunId" not in x.data.tags
    ]
    (batch,) = parents  # one run for the settled batch, not one per request
    assert batch.data.tags["sisa.request_ids"] == ",".join([first.request_id, second.request_id, third.request_id])
    assert batch.info.status == "FINISHED" and batch.data.metrics["requests"] == 3
    assert batch.data.metrics["rows_deleted"] == first.rows_deleted + second.rows_deleted + third.rows_deleted
    rows = client.get_metric_history(batch.info.run_id, "request/rows_deleted")
    assert [(m.step, m.value) for m in sorted(rows, key=lambda m: m.step)] == [
        (0, first.rows_deleted),
        (1, second.rows_deleted),
        (2, third.rows_deleted),
    ]
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{batch.info.run_id}'")
    retrained = {int(s) for r in (first, second, third) for s in r.shards}
    assert sorted(int(c.data.tags["sisa.shard"]) for c in children) == sorted(retrained)


def test_bookkeeping_owed_by_an_exited_process_is_finished_on_open(tmp_path):
    X, y, ids, gone, needles = _marked()
    w = tmp_path / "w"
    SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), w).fit(X, y, ids=ids)
    code = (
        "import json, sys; from sisa import SisaEnsemble;"
        "r = SisaEnsemble.open(sys.argv[1]).delete(json.loads(sys.argv[2]), wait='effective');"
        "print(r.timing['state'])"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(w), json.dumps(gone)], capture_output=True, text=True, cwd=REPO
    )
    assert res.returncode == 0 and res.stdout.split()[-1] == "effective", res.stderr[-2000:]
    led = Ledger(w / "ledger.db")
    assert [q["state"] for q in led.requests()] == ["effective"]
    ens = SisaEnsemble.open(w)  # the owed evaluation, run, publish and purge
    assert [q["state"] for q in led.requests()] == ["done"]
    client = MlflowClient(f"sqlite:///{w / 'mlflow.db'}")
    assert len(_versions(client, ens._ctx.tracker().model_name)) == 1
    assert scan(w, needles) == []


def test_incremental_evaluation_equals_full_evaluation_exactly(tmp_path):
    X, y, ids = tiny_data(n=700)
    ev = slice(400, 700)  # 300 held-out rows: more than the fused path takes, so the loop is the reference
    ens = SisaEnsemble.from_config(tiny_config(), tmp_path / "w").fit(
        X[:400], y[:400], ids=ids[:400], eval_set=(X[ev], y[ev], ids[ev])
    )
    ctx = ens._ctx
    before = dict(ctx._evals)
    assert len(before) == 3
    r = ens.delete([ids[5]])
    retrained = set(r.shards)
    kept = {k[1]: v for k, v in before.items() if k[1] not in retrained}
    after = {k[1]: v for k, v in ctx._evals.items()}
    assert kept and all(after[s] is kept[s] for s in kept), "the shards not retrained were not run again"
    fresh = SisaEnsemble.open(tmp_path / "w")._ctx.evaluate(ens.manifest)
    assert fresh == {k: ens.manifest.metrics[k] for k in fresh}
    rows = np.load(tmp_path / "w" / "eval.npy")
    agg = Aggregator({s: ens.load_shard_model(s) for s in ens.active_shards()}, ens.manifest.num_classes)
    proba, per = agg.predict_all(rows["x"])
    assert fresh["ensemble_accuracy"] == float((decide(proba) == rows["y"]).mean())
    assert fresh["shard_accuracy"] == {str(s): float((p == rows["y"]).mean()) for s, p in zip(agg.shards, per)}
    # an erased evaluation row changes the file's digest: nothing cached on it survives
    r2 = ens.delete([ids[450]])
    assert r2.eval_rows_deleted == 1 and all(k[0] != next(iter(before))[0] for k in ctx._evals)
    with torch.no_grad():
        assert SisaEnsemble.open(tmp_path / "w")._ctx.evaluate(ens.manifest)["eval_rows"] == 299
