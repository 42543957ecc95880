"""Continual data: `add` without a refit, exact to replaying the history without the deleted rows, and erased
ids refused unless readmitted. Real fits (tiny data), no mocks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_config, tiny_data, weights_equal

from shards.errors import DataError
from sisa import SisaEnsemble, costmodel
from sisa.ledger import Ledger


def _files(ens) -> list:
    """Every slice and checkpoint of the ensemble, by digest."""
    return [([e.sha256 for e in sh.slices], [c.sha256 for c in sh.checkpoints]) for sh in ens.manifest.shards]


def _split(n=300, str_ids=True):
    X, y, ids = tiny_data(n=n, str_ids=str_ids)
    ev = slice(n - 30, n)
    return X, y, ids, (X[ev], y[ev], ids[ev])


def _rows(X, y, ids, sl, drop=()):
    keep = ~np.isin(ids[sl], list(drop))
    return X[sl][keep], y[sl][keep], ids[sl][keep]


CONFIGS = [
    ({}, True),
    ({"sharding": {"shards": 2, "slices": 4}, "training": {"epochs": 5, "schedule": "uniform"}, "seed": 11}, False),
    ({"sharding": {"shards": 4, "slices": 2}, "aggregation": {"method": "majority_vote"}}, True),
]


@pytest.mark.parametrize("over,str_ids", CONFIGS)
def test_history_of_fits_adds_and_deletes_equals_replay_and_fit_of_live_rows(tmp_path, over, str_ids):
    X, y, ids, ev = _split(str_ids=str_ids)
    cfg = tiny_config(**over)
    d0, a1, a2 = slice(0, 150), slice(150, 210), slice(210, 270)
    s1 = [ids[3], ids[160], ids[100]]
    s2 = [ids[7], ids[170], ids[220], ev[2][4]]  # the last one is a held-out row
    gone = set(s1 + s2)

    a = SisaEnsemble.from_config(cfg, tmp_path / "a").fit(*_rows(X, y, ids, d0), eval_set=ev)
    r1 = a.add(*_rows(X, y, ids, a1))
    a.delete(s1)
    a.add(*_rows(X, y, ids, a2))
    a.delete(s2)
    assert r1.kind == "add" and r1.rows_added == 60 and r1.hashed_ids == []

    ev_live = tuple(v[~np.isin(ev[2], list(gone))] for v in ev)
    b = SisaEnsemble.from_config(cfg, tmp_path / "b").fit(*_rows(X, y, ids, d0, gone), eval_set=ev_live)
    b.add(*_rows(X, y, ids, a1, gone))
    b.add(*_rows(X, y, ids, a2, gone))
    live = slice(0, 270)
    c = SisaEnsemble.from_config(cfg, tmp_path / "c").fit(*_rows(X, y, ids, live, gone), eval_set=ev_live)

    assert weights_equal(a, b) and weights_equal(a, c)
    assert _files(a) == _files(b) == _files(c)
    assert np.array_equal(a.predict_proba(X[:40]), c.predict_proba(X[:40]))
    assert a.verify().ok


def test_invariant_on_ray(tmp_path, ray_session):
    X, y, ids, ev = _split()
    cfg = tiny_config(cluster={"executor": "ray"})
    a = SisaEnsemble.from_config(cfg, tmp_path / "a").fit(*_rows(X, y, ids, slice(0, 150)), eval_set=ev)
    a.add(*_rows(X, y, ids, slice(150, 220)))
    a.delete([ids[5], ids[200]])
    c = SisaEnsemble.from_config(cfg, tmp_path / "c", executor="inprocess")
    c.fit(*_rows(X, y, ids, slice(0, 220), {ids[5], ids[200]}), eval_set=ev)
    assert weights_equal(a, c) and _files(a) == _files(c)
    a.close()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    X, y, ids, ev = _split()
    wd = tmp_path_factory.mktemp("add") / "w"
    ens = SisaEnsemble.from_config(tiny_config(), wd).fit(X[:150], y[:150], ids=ids[:150], eval_set=ev)
    return {"ens": ens, "X": X, "y": y, "ids": ids, "ev": ev}


def _snapshot(wd):
    ledger = Ledger(wd / "ledger.db").requests() if (wd / "ledger.db").exists() else []
    extra = sorted(str(p.relative_to(wd)) for p in wd.rglob("*") if p.is_file() and "additions" in p.parts)
    store = sorted(str(p.relative_to(wd)) for p in (wd / "store").rglob("*") if p.is_file())
    return (wd / "manifest.json").read_bytes(), len(ledger), extra, store


def _bad_inputs(f):
    X, y, ids, ev = f["X"], f["y"], f["ids"], f["ev"]
    new = slice(150, 160)
    nan = X[new].copy()
    nan[2, 1] = np.nan
    ids_dup = ids[new].copy()
    ids_dup[3] = ids_dup[4]
    return [
        ((X[new], y[new], np.array([ids[0], *ids[151:160]])), r"1 id\(s\) are already in this ensemble \(1 training"),
        ((X[new], y[new], np.array([ev[2][0], *ids[151:160]])), r"already in this ensemble \(0 training, 1 held-out"),
        (
            (X[new][:, :4], y[new], ids[new]),
            r"features have shape \(4,\) per row but the ensemble was trained on \(6,\)",
        ),
        ((X[new], np.full(10, 3), ids[new]), r"labels go up to 3 \(first at row 0\) but the ensemble has 3 classes"),
        ((nan, y[new], ids[new]), r"NaN or inf \(first at row 2\)"),
        ((X[:0], y[:0], ids[:0]), r"empty batch"),
        ((X[new], y[new], np.arange(10)), r"int|str"),
        ((X[new], y[new], ids_dup), r"ids must be unique; 1 are repeated"),
        ((X[new], y[new], ids[150:159]), r"ids has 9 entries but there are 10 rows"),
    ]


def test_bad_batches_are_refused_and_nothing_is_written(fitted):
    ens = fitted["ens"]
    wd = ens.workdir.path
    before = _snapshot(wd)
    for (X, y, ids), match in _bad_inputs(fitted):
        with pytest.raises(DataError, match=match):
            ens.estimate_addition_cost(X, y, ids=ids)
        with pytest.raises(DataError, match=match):
            ens.add(X, y, ids=ids)
        assert _snapshot(wd) == before


def test_erased_ids_are_refused_unless_readmitted_and_the_audit_knows(tmp_path, fitted):
    X, y, ids, ev = fitted["X"], fitted["y"], fitted["ids"], fitted["ev"]
    ens = SisaEnsemble.from_config(tiny_config(), tmp_path / "w").fit(X[:150], y[:150], ids=ids[:150], eval_set=ev)
    ens.delete([ids[4], ids[9]])
    hashes = ens.workdir.hash_ids([ids[4], ids[9]])
    before = _snapshot(ens.workdir.path)
    with pytest.raises(
        DataError, match=rf"2 id\(s\) were erased .*{hashes[0][:16] if hashes[0] < hashes[1] else hashes[1][:16]}"
    ) as e:
        ens.add(X[[4, 9, 150]], y[[4, 9, 150]], ids=ids[[4, 9, 150]])
    assert str(ids[4]) not in str(e.value) and str(ids[9]) not in str(e.value), "only hashed ids are named"
    with pytest.raises(DataError, match=r"readmit names 1 id\(s\) that are not erased"):
        ens.add(X[[4, 150]], y[[4, 150]], ids=ids[[4, 150]], readmit=[ids[4], ids[150]])
    assert _snapshot(ens.workdir.path) == before
    r = ens.add(X[[4, 150]], y[[4, 150]], ids=ids[[4, 150]], readmit=[ids[4]])
    assert r.readmitted == [hashes[0]]
    assert set(Ledger(ens.workdir.path / "ledger.db").readmissions()) == {hashes[0]}
    assert ens.verify().ok, "a readmitted live id is not a deleted id back"
    ens.delete([ids[4]])  # erased again: the old readmission no longer counts
    with pytest.raises(DataError, match=r"1 id\(s\) were erased"):
        ens.add(X[[4]], y[[4]], ids=ids[[4]])
    with pytest.raises(DataError, match=r"fit: 2 id\(s\) were erased"):
        ens.fit(X[:150], y[:150], ids=ids[:150], eval_set=ev, overwrite=True)
    assert ens.verify().ok, "the refused refit changed nothing"
    ens.fit(X[:150], y[:150], ids=ids[:150], eval_set=ev, overwrite=True, readmit=[ids[4], ids[9]])
    live = {h for h in ens.workdir.hash_ids(ids[:150].tolist())}
    assert Ledger(ens.workdir.path / "ledger.db").erased(sorted(live)) == set()


def test_estimate_is_the_receipt_and_the_deletion_formula(tmp_path, fitted):
    X, y, ids, ev = fitted["X"], fitted["y"], fitted["ids"], fitted["ev"]
    ens = SisaEnsemble.from_config(tiny_config(), tmp_path / "w").fit(X[:150], y[:150], ids=ids[:150], eval_set=ev)
    plan = ens.estimate_addition_cost(X[150:158], ids=ids[150:158])
    r = ens.add(X[150:158], y[150:158], ids=ids[150:158])
    assert plan.shards == {s: v["from_stage"] for s, v in r.shards.items()}
    assert plan.sample_epochs == r.cost["sample_epochs"] > 0
    rows, eps = ens.manifest.slice_rows(), ens.config.epochs_per_stage()
    assert plan.sample_epochs == costmodel.plan_cost(rows, eps, plan.shards)["sample_epochs"]
    assert plan.full_retrain_sample_epochs == costmodel.full_cost(rows, eps)
    assert plan.expected_sample_epochs == pytest.approx(costmodel.expected_batched(rows, eps, 8))
    assert sum(v["rows_added"] for v in r.shards.values()) == 8
    assert not list((ens.workdir.path / "additions").glob("*")), "the staged batch is removed once done"


def test_cli_add_csv_by_column_name_and_dry_run(tmp_path, fitted):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    from click.testing import CliRunner

    from sisa.cli.commands import main

    X, y, ids = fitted["X"], fitted["y"], fitted["ids"]
    names = [f"f{k}" for k in range(6)]
    cols = {"id": ids[:150], "label": y[:150], **{n: X[:150, k] for k, n in enumerate(names)}}
    ens = SisaEnsemble.from_config(tiny_config(), tmp_path / "w").fit(pa.table(cols), y[:150], ids=ids[:150])
    new = {**{n: X[150:160, k] for k, n in reversed(list(enumerate(names)))}, "label": y[150:160], "id": ids[150:160]}
    pacsv.write_csv(pa.table(new), tmp_path / "new.csv")  # columns in another order: matched by name
    wd = str(ens.workdir.path)
    out = CliRunner().invoke(main, ["add", "--workdir", wd, "--input", str(tmp_path / "new.csv"), "--dry-run", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["rows"] == 10
    out = CliRunner().invoke(
        main, ["add", "--workdir", wd, "--input", str(tmp_path / "new.csv"), "--executor", "inprocess"]
    )
    assert out.exit_code == 0, out.output
    assert "10 row(s) added (canonical placement)" in out.output
    ref = SisaEnsemble.from_config(tiny_config(), tmp_path / "ref").fit(X[:160], y[:160], ids=ids[:160])
    assert weights_equal(SisaEnsemble.open(wd, executor="inprocess"), ref)
    out = CliRunner().invoke(
        main, ["add", "--workdir", wd, "--input", str(tmp_path / "new.csv"), "--executor", "inprocess"]
    )
    assert out.exit_code == 2 and "10 id(s) are already in this ensemble" in out.output


def test_an_addition_is_an_mlflow_run_with_shard_children_and_the_new_current_version(tmp_path):
    from mlflow import MlflowClient

    X, y, ids, ev = _split()
    ens = SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), tmp_path / "w")
    ens.fit(X[:150], y[:150], ids=ids[:150], eval_set=ev)
    r = ens.add(X[150:170], y[150:170], ids=ids[150:170])
    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [x for x in runs if x.info.run_name.startswith("add")]
    assert len(parent) == 1 and parent[0].data.metrics["rows_added"] == 20
    assert parent[0].data.metrics["sample_epochs"] == r.cost["sample_epochs"]
    kids = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(x.info.run_name for x in kids) == [f"shard-{s:03d}" for s in sorted(r.shards)]
    versions = client.search_model_versions()
    assert [str(v.version) for v in versions] == ["2"], "the addition's version is @current; the fit's was purged"
    assert ens.verify().ok
