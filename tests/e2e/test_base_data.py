"""Base data (non-erasable rows trained once into a start every shard shares) and a pretrained start
(model.init): exactness of delete, refusal of base ids, costs unchanged, the start never retrained, reopen
and the fresh-process audit starting from the same digest-checked start."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import scan, tiny_config, tiny_data, weights_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shards.job import lineage
from sisa import SisaEnsemble
from sisa.cli.render import status_table
from sisa.errors import ConfigError, DataError, IntegrityError
from sisa.ledger import Ledger

GONE = ["u-3", "u-10", "u-77"]


def base_data(n=60):
    X, y, _ = tiny_data(n=n, seed=1)
    return X, y, np.array([f"b-{i}" for i in range(n)])


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fit(path, X, y, ids, base=None, executor="inprocess", **over):
    return SisaEnsemble.from_config(tiny_config(**over), path, executor=executor).fit(X, y, ids=ids, base=base)


def test_delete_with_base_equals_refit_without_the_rows(tmp_path):
    X, y, ids = tiny_data()
    B = base_data()
    a = fit(tmp_path / "a", X, y, ids, base=B)
    m = a.manifest
    assert m.base is not None and m.base.rows == 60 and m.base.init_sha256 is None
    for sh in m.shards:  # every shard's lineage begins with the same start digest
        want = lineage([e.to_dict() for e in sh.slices], 1, m.base.sha256)
        assert sh.checkpoints[0].lineage == want != lineage([e.to_dict() for e in sh.slices], 1)
    start_file = (tmp_path / "a" / "store" / m.base.file).read_bytes()
    a.delete(GONE)
    keep = ~np.isin(ids, GONE)
    b = fit(tmp_path / "b", X[keep], y[keep], ids[keep], base=B)
    assert weights_equal(a, b)
    assert a.manifest.base == m.base  # the start is never retrained
    assert (tmp_path / "a" / "store" / m.base.file).read_bytes() == start_file
    plain = fit(tmp_path / "plain", X[keep], y[keep], ids[keep])
    assert not weights_equal(a, plain)  # the base rows do change the models


def test_ray_delete_with_base_equals_inprocess_refit(tmp_path, ray_session):
    X, y, ids = tiny_data(n=120)
    B = base_data(30)
    over = {"sharding": {"shards": 2, "slices": 2}}
    a = fit(tmp_path / "a", X, y, ids, base=B, executor="ray", **over)
    a.delete(GONE)
    keep = ~np.isin(ids, GONE)
    assert weights_equal(a, fit(tmp_path / "b", X[keep], y[keep], ids[keep], base=B, **over))


def test_deleting_a_base_id_is_refused_and_nothing_is_written(tmp_path):
    X, y, ids = tiny_data()
    ens = fit(tmp_path / "w", X, y, ids, base=base_data())
    before = snapshot(tmp_path / "w")
    for request in (["b-4"], ["u-1", "b-4"]):
        with pytest.raises(DataError, match=r"1 id\(s\) are base rows.*refit without those rows"):
            ens.delete(request)
        with pytest.raises(DataError, match="non-erasable"):
            ens.estimate_deletion_cost(request)
    with pytest.raises(DataError, match="are base rows of this ensemble"):
        ens.add(X[:1], y[:1], ids=["b-5"])
    after = snapshot(tmp_path / "w")
    for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):  # opened (empty) to look the ids up
        after.pop(name, None)
    assert after == before and Ledger(tmp_path / "w" / "ledger.db").requests() == []
    with pytest.raises(DataError, match=r"neither training nor evaluation rows"):
        ens.delete(["nobody"])  # an unknown id is still just unknown
    assert [loc.where for loc in ens.locate(["b-4", "u-1", "nobody"])] == ["base", "training", "unknown"]
    assert ens.status()["base"] == {"rows": 60, "sha256": ens.manifest.base.sha256, "init_sha256": None}
    assert f"shared start {ens.manifest.base.sha256[:12]}: 60 non-erasable base rows" in status_table(ens.status())


def test_a_refit_without_base_data_removes_it(tmp_path):
    X, y, ids = tiny_data()
    Xb, yb, idb = base_data()
    ens = fit(tmp_path / "w", X, y, ids, base=(Xb, yb, idb))
    store = tmp_path / "w" / "store"
    assert sorted(p.name.split("-")[0] for p in (store / "base").iterdir()) == ["rows", "stage"]
    ens.fit(X, y, ids=ids, base=(Xb[10:], yb[10:], idb[10:]), overwrite=True)  # base rows 0..9 removed
    assert len(list((store / "base").iterdir())) == 2
    assert scan(store, [Xb[i].tobytes() for i in range(10)]) == []
    (store / "base" / "stage-00-0123456789ab.pt").write_bytes(b"left by a killed fit")
    ens.fit(X, y, ids=ids, overwrite=True)
    assert ens.manifest.base is None and list((store / "base").iterdir()) == []
    assert scan(tmp_path / "w", [Xb[i].tobytes() for i in range(60)]) == []


def test_an_erased_id_does_not_come_back_as_base_data(tmp_path):
    X, y, ids = tiny_data()
    ens = fit(tmp_path / "w", X, y, ids)
    ens.delete(["u-3"])
    Xb, yb, idb = base_data()
    idb[0] = "u-3"
    keep = ids != "u-3"
    with pytest.raises(DataError, match=r"fit: 1 id\(s\) were erased from this ensemble"):
        ens.fit(X[keep], y[keep], ids=ids[keep], base=(Xb, yb, idb), overwrite=True)
    assert ens.manifest.base is None


def test_base_ids_must_not_collide_with_training_ids(tmp_path):
    X, y, ids = tiny_data()
    Xb, yb, idb = base_data()
    idb[7] = ids[5]
    with pytest.raises(DataError, match=r"1 base id\(s\) are also ids of training"):
        fit(tmp_path / "w", X, y, ids, base=(Xb, yb, idb))
    assert not (tmp_path / "w" / "manifest.json").exists()
    with pytest.raises(DataError, match="base has 60 rows but 59 ids"):
        fit(tmp_path / "w", X, y, ids, base=(Xb, yb, idb[:-1]))
    with pytest.raises(DataError, match="features"):
        fit(tmp_path / "w", X, y, ids, base=(Xb[:, :4], yb))


def test_deletion_cost_is_unchanged_by_base_data(tmp_path):
    X, y, ids = tiny_data()
    a = fit(tmp_path / "a", X, y, ids, base=base_data())
    b = fit(tmp_path / "b", X, y, ids)
    ea, eb = a.estimate_deletion_cost(GONE), b.estimate_deletion_cost(GONE)
    assert ea.sample_epochs == eb.sample_epochs > 0
    assert ea.full_retrain_sample_epochs == eb.full_retrain_sample_epochs
    ra, rb = a.delete(GONE), b.delete(GONE)
    assert {s: v["from_stage"] for s, v in ra.shards.items()} == {s: v["from_stage"] for s, v in rb.shards.items()}
    assert ra.cost["sample_epochs"] == rb.cost["sample_epochs"] == ea.sample_epochs
    for v in ra.shards.values():  # a shard restarted at stage 1 resumes from the start, not a fresh init
        if v["from_stage"] == 1:
            assert v["resumed_from"] == a.manifest.base.sha256


def test_reopen_keeps_the_start_and_the_audit_retrains_from_it(tmp_path):
    X, y, ids = tiny_data(n=120)
    over = {"sharding": {"shards": 2, "slices": 2}}
    fit(tmp_path / "w", X, y, ids, base=base_data(30), **over).close()
    ens = SisaEnsemble.open(tmp_path / "w", executor="inprocess")
    receipt = ens.delete(["u-3"])
    keep = ids != "u-3"
    assert weights_equal(ens, fit(tmp_path / "b", X[keep], y[keep], ids[keep], base=base_data(30), **over))
    report = ens.verify(receipt)
    assert report.ok, [c for c in report.checks if not c.ok]
    assert any(c.target == "base" and c.ok for c in report.checks)
    start = tmp_path / "w" / "store" / ens.manifest.base.file  # swapped: the audit refuses to start from it
    data = bytearray(start.read_bytes())
    data[-40] ^= 1
    start.write_bytes(bytes(data))
    report = ens.verify()
    assert not report.ok
    first = next(loc.id for loc in ens.locate(list(ids[keep])) if loc.slice == 0)  # retrains from stage 1
    with pytest.raises(IntegrityError, match="corrupt"):  # refused before the ledger acknowledges it
        ens.delete([first])
    assert len(Ledger(tmp_path / "w" / "ledger.db").requests()) == 1
    assert any(c.target == "base" and not c.ok and "corrupt" in c.detail for c in report.checks)
    assert not any(report.shards.values())


def test_data_base_from_a_config_file(tmp_path):
    X, y, ids = tiny_data()
    Xb, yb, idb = base_data()
    wd = tmp_path / "w"
    wd.mkdir()
    np.savez(wd / "base.npz", X=Xb, y=yb, ids=idb)
    cfg = tiny_config(data={"base": {"source": "npz", "path": "base.npz"}}, training={"base_epochs": 2})
    a = SisaEnsemble.from_config(cfg, wd, executor="inprocess").fit(X, y, ids=ids)
    b = fit(tmp_path / "b", X, y, ids, base=(Xb, yb, idb), training={"base_epochs": 2})
    assert a.manifest.base.sha256 == b.manifest.base.sha256 and weights_equal(a, b)
    with pytest.raises(DataError, match="are base rows"):
        a.delete(["b-0"])


# -- model.init: a pretrained start ----------------------------------------------------------------------
def pretrained(tmp_path, X, y, ids) -> tuple[str, str]:
    """A state dict of the tiny MLP (the final sub-model of a one-shard fit), saved as a plain file."""
    donor = fit(tmp_path / "donor", X, y, ids, sharding={"shards": 1, "slices": 1})
    path = tmp_path / "init.pt"
    torch.save(donor.load_shard_model(0).state_dict(), path)
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


def test_model_init_is_the_start_and_its_digest_is_in_the_lineage(tmp_path):
    X, y, ids = tiny_data()
    path, digest = pretrained(tmp_path, X, y, ids)
    init = {"init": {"uri": path, "sha256": digest}}
    a = fit(tmp_path / "a", X, y, ids, model=init | tiny_config()["model"])
    m = a.manifest
    assert m.base.init_sha256 == digest and m.base.rows == 0
    cfg_lineage = json.loads((tmp_path / "a" / "manifest.json").read_text())["base"]["lineage"]
    from shards.base import start_lineage

    assert cfg_lineage == start_lineage(digest, None)
    plain = fit(tmp_path / "p", X, y, ids)
    assert m.shards[0].checkpoints[0].lineage != plain.manifest.shards[0].checkpoints[0].lineage
    assert not weights_equal(a, plain)
    a.delete(GONE)
    keep = ~np.isin(ids, GONE)
    assert weights_equal(a, fit(tmp_path / "b", X[keep], y[keep], ids[keep], model=init | tiny_config()["model"]))
    report = a.verify()
    assert report.ok, [c for c in report.checks if not c.ok]
    assert report.start["init_sha256"] == digest and report.to_dict()["start"]["sha256"] == m.base.sha256
    assert f"model.init sha256 {digest[:12]}" in report.text()
    # with base rows too: the base stage starts from the pretrained weights
    c = fit(tmp_path / "c", X, y, ids, base=base_data(), model=init | tiny_config()["model"])
    d = fit(tmp_path / "d", X, y, ids, base=base_data())
    assert c.manifest.base.init_sha256 == digest and c.manifest.base.sha256 != d.manifest.base.sha256


def test_model_init_digest_mismatch_is_refused_before_loading(tmp_path, monkeypatch):
    X, y, ids = tiny_data()
    path, digest = pretrained(tmp_path, X, y, ids)
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(1) or real(*a, **k))
    wrong = "0" * 64
    model = tiny_config()["model"] | {"init": {"uri": path, "sha256": wrong}}
    with pytest.raises(IntegrityError, match="sha256 is .* but model.init.sha256 says 0000"):
        fit(tmp_path / "w", X, y, ids, model=model)
    assert loads == []
    assert not (tmp_path / "w").exists() or snapshot(tmp_path / "w") == {}


def test_model_init_is_loaded_weights_only(tmp_path):
    X, y, ids = tiny_data()
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": ValueError("not a tensor")}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = tiny_config()["model"] | {"init": {"uri": str(path), "sha256": digest}}
    with pytest.raises(IntegrityError, match="cannot be loaded safely"):
        fit(tmp_path / "w", X, y, ids, model=model)
    torch.save({"w": torch.zeros(2)}, path)  # a state dict, of another model
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = tiny_config()["model"] | {"init": {"uri": str(path), "sha256": digest}}
    ens = fit(tmp_path / "w2", X, y, ids)
    before = snapshot(tmp_path / "w2")
    refit = SisaEnsemble.from_config(tiny_config(model=model), tmp_path / "w2", executor="inprocess")
    with pytest.raises(ConfigError, match="does not fit model 'mlp'"):
        refit.fit(X, y, ids=ids, overwrite=True)
    assert snapshot(tmp_path / "w2") == before and ens.manifest.base is None  # the old ensemble stands


def test_model_init_config_is_checked():
    from sisa import load_config

    with pytest.raises(ConfigError, match="model.init.sha256"):
        load_config(tiny_config(model={"name": "mlp", "init": {"uri": "x.pt", "sha256": "abc"}}))
    with pytest.raises(ConfigError, match="data.base.source"):
        load_config(tiny_config(data={"base": {"source": "digits", "path": "x"}}))


def test_data_base_beside_a_streamed_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def table(X, y, ids):
        return pa.table({"id": ids, **{f"f{k}": X[:, k] for k in range(X.shape[1])}, "label": y})

    X, y, ids = tiny_data()
    Xb, yb, idb = base_data()
    wd = tmp_path / "w"
    wd.mkdir()
    pq.write_table(table(X, y, ids), wd / "train.parquet")
    pq.write_table(table(Xb, yb, idb), wd / "base.parquet")
    data = {"source": "parquet", "path": "train.parquet", "base": {"source": "parquet", "path": "base.parquet"}}
    ens = SisaEnsemble.from_config(tiny_config(data=data), wd, executor="inprocess").fit()
    assert ens.manifest.base.rows == 60
    with pytest.raises(DataError, match="are base rows"):
        ens.delete(["b-1"])
    idb[3] = ids[0]
    (tmp_path / "w2").mkdir()
    pq.write_table(table(Xb, yb, idb), tmp_path / "w2" / "clash.parquet")
    data["base"]["path"] = "clash.parquet"
    with pytest.raises(DataError, match=r"1 base id\(s\) are also ids of training or evaluation rows"):
        SisaEnsemble.from_config(tiny_config(data=data), tmp_path / "w2", executor="inprocess").fit(
            wd / "train.parquet"
        )
    assert not (tmp_path / "w2" / "manifest.json").exists()
    assert [p.name for p in (tmp_path / "w2").rglob("*") if p.is_file() and "store" in p.parts] == []
    # a refit over the live ensemble is refused before it retires it: the ensemble still serves, unchanged
    pq.write_table(table(Xb, yb, idb), wd / "clash.parquet")
    before, want = snapshot(wd), ens.predict(X)
    with pytest.raises(DataError, match=r"1 base id\(s\) are also ids of training or evaluation rows"):
        SisaEnsemble.from_config(tiny_config(data=data), wd, executor="inprocess").fit(overwrite=True)
    again = SisaEnsemble.open(wd)
    assert np.array_equal(again.predict(X), want) and again.manifest.base.rows == 60
    assert {k: v for k, v in snapshot(wd).items() if not k.startswith("ledger.db")} == {
        k: v for k, v in before.items() if not k.startswith("ledger.db")
    }


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_any_sequence_with_base_equals_a_fit_of_the_live_rows(data):
    """Random deletions, additions and refused base-id deletions on an ensemble with base data: it stays,
    bit for bit, the fit of the rows that are live with the same base data (the start never retrained)."""
    X, y, ids = tiny_data(n=160)
    B = base_data(20)
    over = {"sharding": {"shards": 2, "slices": 2}, "training": {"epochs": 2}, "data": {"test_fraction": 0.0}}
    live = set(range(120))  # rows 120.. are the pool that additions draw from
    with tempfile.TemporaryDirectory() as d:
        ens = fit(Path(d) / "w", X[:120], y[:120], ids[:120], base=B, **over)
        start = ens.manifest.base
        for _ in range(data.draw(st.integers(1, 3))):
            op = data.draw(st.sampled_from(["delete", "add", "base"]))
            if op == "delete":
                gone = data.draw(st.lists(st.sampled_from(sorted(live)), min_size=1, max_size=5, unique=True))
                ens.delete(list(ids[gone]))
                live -= set(gone)
            elif op == "add":
                new = data.draw(st.lists(st.sampled_from(range(120, 160)), min_size=1, max_size=5, unique=True))
                new = [i for i in new if i not in live]
                if not new:
                    continue
                try:
                    ens.add(X[new], y[new], ids=list(ids[new]))
                except DataError as e:  # a row added and deleted before is erased: it needs readmit
                    assert "readmit" in str(e)
                    continue
                live |= set(new)
            else:
                with pytest.raises(DataError, match="are base rows"):
                    ens.delete([B[2][data.draw(st.integers(0, 19))]])
        rows = sorted(live)
        assert ens.manifest.base == start
        assert weights_equal(ens, fit(Path(d) / "ref", X[rows], y[rows], ids[rows], base=B, **over))


def test_repair_rebuilds_a_first_stage_from_the_start(tmp_path):
    X, y, ids = tiny_data(n=120)
    over = {"sharding": {"shards": 2, "slices": 2}}
    ref = fit(tmp_path / "ref", X, y, ids, base=base_data(30), **over)
    ens = fit(tmp_path / "w", X, y, ids, base=base_data(30), **over)
    first = tmp_path / "w" / "store" / ens.manifest.shards[0].checkpoints[0].file
    first.write_bytes(first.read_bytes()[:100])  # truncated: the rebuild starts at stage 1, from the start
    out = ens.repair()
    fixed = SisaEnsemble.open(tmp_path / "w", executor="inprocess")
    c = fixed.manifest.shards[0].checkpoints[0]
    assert fixed.storage().read(c.file, c.sha256) and c == ref.manifest.shards[0].checkpoints[0], out
    assert weights_equal(fixed, ref)
