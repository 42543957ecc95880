"""Exact deletion: fit(D).delete(S) == fit(D \\ S) bit for bit, only what is needed is retrained,
the ledger is durable and hashed, receipts, and bad input leaves everything unchanged."""

import json
import threading

import numpy as np
import pytest
from helpers import store_files, tiny_config, tiny_data, weights_equal

from shards.store import read_slice
from sisa import SisaEnsemble
from sisa.errors import DataError, NotFittedError, UnknownIdsError
from sisa.ledger import Ledger

CONFIGS = {
    "adam-3x3": tiny_config(),
    "sgd-momentum-R1-int-ids": tiny_config(
        sharding={"shards": 4, "slices": 1}, training={"optimizer": "sgd", "momentum": 0.9, "lr": 0.05, "epochs": 3}
    ),
    "vote-4x5-explicit-schedule": tiny_config(
        sharding={"shards": 4, "slices": 5},
        aggregation={"method": "majority_vote"},
        training={"schedule": [2, 1, 0, 2, 1]},
    ),
}


def fit(cfg, wd, X, y, ids, executor="inprocess"):
    return SisaEnsemble.from_config(cfg, wd, executor=executor).fit(X, y, ids=ids)


def drop(X, y, ids, gone):
    keep = ~np.isin(ids, list(gone))
    return X[keep], y[keep], ids[keep]


def pick(ens, ids, where):
    """Ids in chosen (shard, slice) places: ``where`` is a list of (shard, slice or 'first'/'last')."""
    R = ens.config.sharding.slices
    out = []
    for s, j in where:
        j = 0 if j == "first" else R - 1 if j == "last" else j
        out.append(next(i for i in ids.tolist() if ens.shard_of(i) == (s, j) and i not in out))
    return out


def ckpt_files(ens):
    return [[(c["file"], c["sha256"]) for c in sh["checkpoints"]] for sh in ens.manifest["shards"]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_delete_equals_fit_without_the_rows(tmp_path, name):
    cfg = CONFIGS[name]
    X, y, ids = tiny_data(n=300, str_ids="int" not in name)
    ens = fit(cfg, tmp_path / "a", X, y, ids)
    before = ckpt_files(ens)
    R = cfg["sharding"]["slices"]
    gone = pick(ens, ids, [(0, "first"), (1, "last"), (2, R // 2), (1, "last")])
    receipt = ens.delete(gone)
    ref = fit(cfg, tmp_path / "b", *drop(X, y, ids, gone))
    assert weights_equal(ens, ref)
    assert np.array_equal(ens.predict_proba(X), ref.predict_proba(X))
    starts = {0: 1, 1: R, 2: R // 2 + 1}
    assert {s: v["from_stage"] for s, v in receipt.shards.items()} == starts
    after = ckpt_files(ens)
    for s in range(cfg["sharding"]["shards"]):
        keep = starts.get(s, R + 1) - 1
        assert after[s][:keep] == before[s][:keep], f"shard {s}: checkpoints before stage {keep + 1} must be untouched"
        for f, sha in after[s][:keep]:
            assert read_bytes_sha(ens, f) == sha
    assert ckpt_files(ens) == ckpt_files(ref), "same files, same bytes as a fresh fit without the rows"


def read_bytes_sha(ens, f):
    import hashlib

    return hashlib.sha256(ens.storage().read(f)).hexdigest()


def test_on_ray_several_deletions_in_a_row_and_resume_points(tmp_path, ray_session):
    cfg = tiny_config(sharding={"shards": 3, "slices": 4})
    X, y, ids = tiny_data(n=300)
    ens = fit(cfg, tmp_path / "a", X, y, ids, executor="ray")
    before = ens.manifest.to_dict()
    first = pick(ens, ids, [(0, 2), (2, 3)])
    r1 = ens.delete(first)
    assert r1.shards[0]["from_stage"] == 3 and r1.shards[2]["from_stage"] == 4
    assert r1.shards[0]["resumed_from"] == before["shards"][0]["checkpoints"][1]["sha256"]
    assert 1 not in r1.shards, "an untouched shard is not retrained"
    assert store_files(ens) == ens.manifest.referenced_files(), "every superseded slice and checkpoint is purged"
    second = pick(ens, ids, [(1, 0), (0, 1)])
    ens.delete(second)
    assert store_files(ens) == ens.manifest.referenced_files()
    ref = fit(cfg, tmp_path / "b", *drop(X, y, ids, first + second), executor="ray")
    assert weights_equal(ens, ref)
    assert np.array_equal(ens.predict_proba(X), ref.predict_proba(X))
    ens.close()
    ref.close()


def test_whole_slice_and_whole_shard(tmp_path):
    cfg = tiny_config(sharding={"shards": 3, "slices": 3})
    X, y, ids = tiny_data(n=240)
    ens = fit(cfg, tmp_path / "a", X, y, ids)
    slice0 = [i for i in ids.tolist() if ens.shard_of(i) == (1, 0)]
    shard2 = [i for i in ids.tolist() if ens.shard_of(i)[0] == 2]
    ens.delete(slice0)
    r = ens.delete(shard2)
    assert r.shards[2]["from_stage"] == 1
    assert ens.active_shards() == [0, 1], "the emptied shard leaves the ensemble"
    assert ens.predict_proba(X).shape == (240, 3)
    ref = fit(cfg, tmp_path / "b", *drop(X, y, ids, slice0 + shard2))
    assert weights_equal(ens, ref) and np.array_equal(ens.predict_proba(X), ref.predict_proba(X))
    assert ens.status()["shards"][2]["rows"] == 0
    assert store_files(ens) == ens.manifest.referenced_files()


def test_predictions_stay_defined_while_one_shard_has_data(tmp_path):
    X, y, ids = tiny_data(n=120)
    ens = fit(tiny_config(sharding={"shards": 2, "slices": 2}), tmp_path / "a", X, y, ids)
    ens.delete([i for i in ids.tolist() if ens.shard_of(i)[0] == 0])
    assert ens.predict(X).shape == (120,)
    ens.delete([i for i in ids.tolist() if ens.shard_of(i)[0] == 1])
    with pytest.raises(NotFittedError, match="no shard holds data any more: every training row"):
        ens.predict(X)


def test_affected_shards_are_excluded_while_retraining(tmp_path):
    X, y, ids = tiny_data(n=240)
    ens = fit(tiny_config(), tmp_path / "a", X, y, ids)
    gone = pick(ens, ids, [(1, 0)])
    seen = []

    def during(plan, entry, metrics):
        seen.append((ens.active_shards(), ens._server.aggregator().shards, ens.predict(X[:3]).shape))

    ens.delete(gone, progress=during)
    assert seen and all(act == [0, 2] and agg == [0, 2] for act, agg, _ in seen)
    assert ens.active_shards() == [0, 1, 2]


def test_a_retrain_that_fails_before_it_is_sent_still_excludes_the_shards(tmp_path, monkeypatch):
    """The exclusion is committed while the retrain runs (`Executor.run`'s ``meanwhile``); a retrain that
    fails before it is sent (no worker could be placed, say) commits it all the same, and the next open
    finishes the request."""
    from sisa.context import OpContext

    cfg = tiny_config(sharding={"shards": 3, "slices": 2})
    X, y, ids = tiny_data(n=150)
    ens = fit(cfg, tmp_path / "a", X, y, ids)
    gone = [ids[5]]
    shard = ens.shard_of(gone[0])[0]

    def unplaced(self, *a, **k):
        raise RuntimeError("no shard worker could be placed")

    monkeypatch.setattr(OpContext, "run_plans", unplaced)
    with pytest.raises(RuntimeError, match="no shard worker could be placed"):
        ens.delete(gone)
    m = ens._ctx.read_manifest()
    assert m.shards[shard].excluded and m.retraining is not None and shard not in ens.active_shards()
    monkeypatch.undo()
    reopened = SisaEnsemble.open(tmp_path / "a", executor="inprocess")
    assert shard in reopened.active_shards() and reopened.manifest.retraining is None
    ref = fit(cfg, tmp_path / "b", *drop(X, y, ids, gone))
    assert weights_equal(reopened, ref)


def test_ledger_is_durable_hashed_and_moves_to_done(tmp_path):
    X, y, ids = tiny_data(n=120)
    ens = fit(tiny_config(), tmp_path / "a", X, y, ids)
    r = ens.delete(["u-7", "u-8"])
    led = Ledger(ens.workdir.path / "ledger.db")
    reqs = led.requests()
    assert [q["state"] for q in reqs] == ["done"] and reqs[0]["id"] == r.request_id
    assert sorted(led.hashed_ids(r.request_id)) == sorted(ens.workdir.hash_ids(["u-7", "u-8"]))
    raw = (ens.workdir.path / "ledger.db").read_bytes()
    assert b"u-7" not in raw and b"u-8" not in raw
    saved = json.loads((ens.workdir.path / "receipts" / f"{r.request_id}.json").read_text())
    assert saved["request_id"] == r.request_id and saved["config_hash"] == ens.manifest["config_hash"]
    assert "u-7" not in json.dumps(saved)


def test_unfinished_request_is_finished_on_open(tmp_path):
    X, y, ids = tiny_data(n=240)
    ens = fit(tiny_config(), tmp_path / "a", X, y, ids)
    gone = pick(ens, ids, [(0, 1), (2, 0)])
    # a driver that died right after the ledger commit
    plan = {"slices": sorted([list(ens.shard_of(i)) for i in gone])}
    Ledger(ens.workdir.path / "ledger.db").record(ens.workdir.hash_ids(gone), plan)
    reopened = SisaEnsemble.open(ens.workdir.path, executor="inprocess")
    assert [q["state"] for q in Ledger(ens.workdir.path / "ledger.db").requests()] == ["done"]
    ref = fit(tiny_config(), tmp_path / "b", *drop(X, y, ids, gone))
    assert weights_equal(reopened, ref)


def test_bad_ids_change_nothing(tmp_path):
    X, y, ids = tiny_data(n=120)
    ens = fit(tiny_config(), tmp_path / "a", X, y, ids)
    manifest = (ens.workdir.path / "manifest.json").read_bytes()
    with pytest.raises(UnknownIdsError, match="'nobody-1', 'nobody-2'") as e:
        ens.delete(["u-1", "nobody-1", "nobody-2"])
    assert e.value.ids == ["nobody-1", "nobody-2"]
    with pytest.raises(DataError, match="at least one id"):
        ens.delete([])
    with pytest.raises(DataError, match="ids are int but this ensemble's ids are str"):
        ens.delete([1, 2])
    assert (ens.workdir.path / "manifest.json").read_bytes() == manifest
    assert Ledger(ens.workdir.path / "ledger.db").requests() == []


def test_duplicates_collapse_and_repeats_are_idempotent(tmp_path):
    X, y, ids = tiny_data(n=120)
    ens = fit(tiny_config(), tmp_path / "a", X, y, ids)
    r = ens.delete(["u-3", "u-3", "u-4"])
    assert r.rows_deleted == 2
    again = ens.delete(["u-3", "u-4"])
    assert again.request_id is None and again.already_deleted == 2 and again.rows_deleted == 0
    mixed = ens.delete(["u-3", "u-5"])
    assert mixed.rows_deleted == 1 and mixed.already_deleted == 1


def test_estimate_matches_what_delete_does(tmp_path):
    X, y, ids = tiny_data(n=240)
    ens = fit(tiny_config(), tmp_path / "a", X, y, ids)
    gone = pick(ens, ids, [(0, 2), (1, 1), (1, 2)])
    plan = ens.estimate_deletion_cost(gone)
    assert plan.shards == {0: 3, 1: 2} and plan.rows == 3
    assert 0 < plan.sample_epochs < plan.full_retrain_sample_epochs
    r = ens.delete(gone)
    assert {s: v["from_stage"] for s, v in r.shards.items()} == plan.shards


@pytest.mark.slow
def test_concurrent_threads_serialise_and_lose_nothing(tmp_path):
    X, y, ids = tiny_data(n=240)
    ens = fit(tiny_config(), tmp_path / "a", X, y, ids)
    groups = [["u-1", "u-2", "u-3"], ["u-3", "u-4"], ["u-10", "u-11", "u-1"], ["u-20"]]
    receipts, errors = [], []

    def work(g):
        try:
            receipts.append(ens.delete(g))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(g,)) for g in groups]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    union = sorted({i for g in groups for i in g})
    assert sum(r.rows_deleted for r in receipts) == len(union), "each id deleted exactly once"
    ref = fit(tiny_config(), tmp_path / "b", *drop(X, y, ids, union))
    assert weights_equal(ens, ref)
    for sh in ens.manifest["shards"]:
        for e in sh["slices"]:
            assert not set(read_slice(ens.storage(), e)["id"].tolist()) & set(union)


def test_a_serving_process_follows_a_deletion_made_by_another(tmp_path):
    import subprocess
    import sys

    X, y, ids = tiny_data(n=180)
    fit(tiny_config(), tmp_path / "a", X, y, ids)
    server = SisaEnsemble.open(tmp_path / "a", executor="inprocess")
    before = server.predict_proba(X)
    gone = pick(server, ids, [(0, 0), (2, 1)])
    code = "import sys, json; from sisa import SisaEnsemble; SisaEnsemble.open(sys.argv[1], executor='inprocess').delete(json.loads(sys.argv[2]))"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a"), json.dumps(gone)], check=True, capture_output=True)
    after = server.predict_proba(X)
    fresh = SisaEnsemble.open(tmp_path / "a", executor="inprocess")
    assert not np.array_equal(before, after) and np.array_equal(after, fresh.predict_proba(X))
