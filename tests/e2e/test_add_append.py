"""Append placement (`sharding.new_rows: append`): an addition is one more slice and stage at the end of each
shard it lands in; the ensemble equals the replay of its history without the deleted rows, bit for bit.
Real fits (tiny data), no mocks."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import store_files, tiny_config, tiny_data, weights_equal

from sisa import SisaEnsemble, costmodel
from sisa.ledger import Ledger


def _files(ens) -> list:
    """Every shard's slice and checkpoint files (names and digests) and its own schedule."""
    return [
        ([(e.file, e.sha256) for e in sh.slices], [(c.file, c.sha256) for c in sh.checkpoints], sh.epochs)
        for sh in ens.manifest.shards
    ]


def _data(n=330, str_ids=True):
    X, y, ids = tiny_data(n=n, str_ids=str_ids)
    ev = slice(n - 30, n)
    return X, y, ids, (X[ev], y[ev], ids[ev])


def _rows(X, y, ids, sl, drop=()):
    keep = ~np.isin(ids[sl], list(drop))
    return X[sl][keep], y[sl][keep], ids[sl][keep]


def _append(over=None, **kw) -> dict:
    cfg = tiny_config(**(over or {}))
    cfg["sharding"] = {**cfg["sharding"], "new_rows": "append", **kw}
    return cfg


CONFIGS = [
    ({}, True, {}),
    ({"sharding": {"shards": 2, "slices": 4}, "training": {"epochs": 5, "schedule": "uniform"}, "seed": 11}, False, {}),
    ({"sharding": {"shards": 4, "slices": 2}, "aggregation": {"method": "majority_vote"}}, True, {"append_epochs": 3}),
]


@pytest.mark.parametrize("over,str_ids,kw", CONFIGS)
def test_append_history_equals_replay_without_the_deleted_rows(tmp_path, over, str_ids, kw):
    """fit(D0).add(A1).add(A2).delete(S1).add(A3).delete(S2) == fit(D0\\S).add(A1\\S).add(A2\\S).add(A3\\S),
    S1 holding a canonical row, an appended row and every row A1 put in one shard (its appended slice goes,
    the later one moves up), S2 a held-out row and a row of the last batch."""
    X, y, ids, ev = _data(str_ids=str_ids)
    cfg = _append(over, **kw)
    d0, a1, a2, a3 = slice(0, 150), slice(150, 160), slice(160, 230), slice(230, 300)
    a = SisaEnsemble.from_config(cfg, tmp_path / "a").fit(*_rows(X, y, ids, d0), eval_set=ev)
    a.add(*_rows(X, y, ids, a1))
    first = a.manifest
    emptied = a.shard_of(ids[150])[0]
    in_a1 = [i for i in ids[a1] if a.shard_of(i)[0] == emptied]
    r2 = a.add(*_rows(X, y, ids, a2))
    assert all(v["from_stage"] == len(first.shards[s].slices) + 1 for s, v in r2.shards.items())
    s1 = [ids[3], ids[170], *in_a1]
    d1 = a.delete(s1)
    assert d1.cost["appended_stages_sample_epochs"] > 0
    assert store_files(a) == a.manifest.referenced_files(), "superseded files and the emptied slice written are purged"
    a.add(*_rows(X, y, ids, a3))
    s2 = [ev[2][4], ids[240]]
    a.delete(s2)
    gone = set(s1 + s2)

    ev_live = tuple(v[~np.isin(ev[2], list(gone))] for v in ev)
    b = SisaEnsemble.from_config(cfg, tmp_path / "b").fit(*_rows(X, y, ids, d0, gone), eval_set=ev_live)
    for sl in (a1, a2, a3):
        b.add(*_rows(X, y, ids, sl, gone))
    assert weights_equal(a, b)
    assert _files(a) == _files(b)
    assert np.array_equal(a.predict_proba(X[:40]), b.predict_proba(X[:40]))
    R = a.config.sharding.slices
    e_a = kw.get("append_epochs", a.config.epochs_per_stage()[-1])
    assert len(a.manifest.shards[emptied].slices) == R + 2, "A1's emptied slice went, A2's and A3's stay"
    assert a.manifest.shards[emptied].epochs == (*a.config.epochs_per_stage(), e_a, e_a)
    assert a.active_shards() == list(range(a.config.sharding.shards))
    assert a.verify().ok


def test_append_on_ray_equals_inprocess_replay(tmp_path, ray_session):
    X, y, ids, ev = _data()
    cfg = _append({"cluster": {"executor": "ray"}})
    a = SisaEnsemble.from_config(cfg, tmp_path / "a").fit(*_rows(X, y, ids, slice(0, 150)), eval_set=ev)
    a.add(*_rows(X, y, ids, slice(150, 220)))
    a.delete([ids[5], ids[200]])
    a.add(*_rows(X, y, ids, slice(220, 260)))
    gone = {ids[5], ids[200]}
    b = SisaEnsemble.from_config(cfg, tmp_path / "b", executor="inprocess")
    b.fit(*_rows(X, y, ids, slice(0, 150), gone), eval_set=ev)
    b.add(*_rows(X, y, ids, slice(150, 220), gone))
    b.add(*_rows(X, y, ids, slice(220, 260), gone))
    assert weights_equal(a, b) and _files(a) == _files(b)
    a.close()


def test_append_estimate_is_the_receipt_and_the_cost_formulas(tmp_path):
    X, y, ids, ev = _data()
    a = SisaEnsemble.from_config(_append(), tmp_path / "a").fit(*_rows(X, y, ids, slice(0, 150)), eval_set=ev)
    before = a.manifest.slice_rows()
    plan = a.estimate_addition_cost(X[150:190], ids=ids[150:190])
    r = a.add(X[150:190], y[150:190], ids=ids[150:190])
    m, base, e_a = a.manifest, a.config.epochs_per_stage(), a.config.epochs_per_stage()[-1]
    assert plan.placement == r.placement == "append"
    assert plan.shards == {s: v["from_stage"] for s, v in r.shards.items()} == {s: 4 for s in range(3)}
    want = sum(e_a * sh.rows for sh in m.shards)  # one stage on all of each shard's slices, e_a epochs
    assert plan.sample_epochs == r.cost["sample_epochs"] == want
    assert all(v["checkpoints_before"] == [] and len(v["checkpoints_after"]) == 1 for v in r.shards.values())
    assert r.cost["expected_sample_epochs"] == pytest.approx(costmodel.expected_append(before, e_a, 40))
    assert r.cost["expected_sample_epochs"] == pytest.approx(want, rel=0.01), "40 ids hit every one of 3 shards"
    sched = m.schedules(base)
    overhead = sum(e_a * sh.rows**2 for sh in m.shards) / sum(sh.rows for sh in m.shards)
    assert r.cost["deletion_overhead_sample_epochs"] == pytest.approx(overhead)
    assert costmodel.expected_single(m.slice_rows(), sched) == pytest.approx(
        costmodel.expected_single(m.slice_rows(), [e[:3] for e in sched]) + overhead
    ), "the overhead is what the appended stages add to one uniform deletion"
    d = a.estimate_deletion_cost([ids[0]])
    s, j = a.shard_of(ids[0])
    rows = list(m.slice_rows()[s])
    rows[j] -= 1  # a deletion is priced on the partition it leaves (the receipt's figure)
    assert d.sample_epochs == costmodel.retrain_cost(rows, sched[s], j + 1)
    assert a.delete([ids[0]]).cost["sample_epochs"] == d.sample_epochs
    assert [x["checkpoints"] for x in a.status()["shards"]] == [4, 4, 4]


def test_status_counts_additions_apart_from_deletions(tmp_path):
    X, y, ids, ev = _data()
    a = SisaEnsemble.from_config(_append(), tmp_path / "a").fit(*_rows(X, y, ids, slice(0, 150)), eval_set=ev)
    a.add(X[150:160], y[150:160], ids=ids[150:160])
    a.add(X[160:170], y[160:170], ids=ids[160:170])
    a.delete([ids[1]])
    st = a.status()
    assert st["deletions"] == {"done": 1, "unfinished": 0}
    assert st["additions"] == {"done": 2, "unfinished": 0}
    assert [x["stages"] for x in st["shards"]] == [len(sh.slices) for sh in a.manifest.shards]
    assert len(Ledger(a.workdir.path / "ledger.db").requests()) == 3


def test_repair_rebuilds_an_appended_stage_with_its_own_schedule(tmp_path):
    X, y, ids, ev = _data()
    a = SisaEnsemble.from_config(_append(append_epochs=3), tmp_path / "a")
    a.fit(*_rows(X, y, ids, slice(0, 150)), eval_set=ev)
    a.add(X[150:200], y[150:200], ids=ids[150:200])
    before = (a.workdir.path / "manifest.json").read_bytes()
    ck = a.manifest.shards[1].checkpoints[-1]
    path = a.workdir.path / "store" / ck.file
    good = path.read_bytes()
    path.write_bytes(b"not a checkpoint")
    assert a.repair() == {"repaired": {1: 4}, "unrepairable": []}
    assert path.read_bytes() == good, "the appended stage is rebuilt bit for bit, with its own epochs"
    assert (a.workdir.path / "manifest.json").read_bytes() == before
