"""Held-out evaluation rows are personal data too: `delete` erases them from eval.npy (no retraining), the
receipt and ledger record them (hashed), the byte scan finds nothing, and the evaluation file is the one
a fit without those rows writes. Rows given without ids cannot be named, and sisa says so."""

import json
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import scan, tiny_config, tiny_data

from shards.partition import holdout_mask
from sisa import SisaEnsemble
from sisa.errors import DataError, UnknownIdsError
from sisa.ledger import Ledger

FRACTION = 0.25


def world(n=300):
    """Rows with distinctive ids (fixed width: no id is a prefix of another) and the held-out mask."""
    X, y, _ = tiny_data(n=n)
    ids = np.array([f"person-{i:05d}-x" for i in range(n)])
    held = holdout_mask(ids, tiny_config()["seed"], FRACTION)
    return X, y, ids, held


def mark(X, rows):
    for k, r in enumerate(rows):  # feature bytes that occur nowhere else
        X[r] = np.float32(4242.5 + k) + np.arange(X.shape[1], dtype=np.float32)


def fit_arrays(wd, X, y, ids, held):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="eval_set has no ids")  # they have ids: no warning
        return SisaEnsemble.from_config(tiny_config(), wd).fit(
            X[~held], y[~held], ids=ids[~held], eval_set=(X[held], y[held], ids[held])
        )


def fit_parquet(wd, tmp_path, X, y, ids):
    src = tmp_path / "train.parquet"  # outside the workdir: the user's file, not a copy sisa wrote
    cols = {"id": ids, **{f"f{k}": X[:, k] for k in range(X.shape[1])}, "label": y}
    pq.write_table(pa.table(cols), src)
    return SisaEnsemble.from_config(tiny_config(data={"test_fraction": FRACTION}), wd).fit(str(src))


@pytest.mark.parametrize("how", ["arrays", "parquet"])
def test_held_out_rows_are_erased_everywhere(tmp_path, how):
    X, y, ids, held = world()
    victims = [int(r) for r in np.flatnonzero(held)[[0, 5]]] + [int(np.flatnonzero(~held)[3])]
    mark(X, victims)
    wd = tmp_path / "w"
    ens = fit_arrays(wd, X, y, ids, held) if how == "arrays" else fit_parquet(wd, tmp_path, X, y, ids)
    gone = [str(ids[r]) for r in victims]
    needles = [X[r].tobytes() for r in victims] + [i.encode() for i in gone] + [i.encode("utf-32-le") for i in gone]
    assert {n for _, n in scan(wd, needles)} >= {X[r].tobytes() for r in victims}, "the scan sees them before"

    plan = ens.estimate_deletion_cost(gone[:2])
    assert plan.eval_rows == 2 and plan.shards == {} and plan.rows == 0 and plan.sample_epochs == 0
    receipt = ens.delete(gone)
    assert receipt.eval_rows_deleted == 2 and receipt.rows_deleted == 1
    led = Ledger(wd / "ledger.db")
    assert sorted(led.hashed_ids(receipt.request_id)) == sorted(ens.workdir.hash_ids(gone))
    assert led.receipt(receipt.request_id)["eval_rows_deleted"] == 2
    saved = json.loads((wd / "receipts" / f"{receipt.request_id}.json").read_text())
    assert saved["eval_rows_deleted"] == 2 and saved["hashed_ids"] == sorted(ens.workdir.hash_ids(gone))
    ens.close()
    assert scan(wd, needles) == [], "no byte and no raw id of the erased rows is left anywhere in the workdir"
    assert not [p for p in wd.rglob("*") if ".tmp-" in p.name or p.name == ".eval-ingest.npy"]

    # the evaluation file and the figures are those of a fit that never had the rows
    keep = ~np.isin(ids, gone)
    ref = fit_arrays(tmp_path / "ref", X[keep], y[keep], ids[keep], held[keep])
    assert (wd / "eval.npy").read_bytes() == (tmp_path / "ref" / "eval.npy").read_bytes()
    assert ens.manifest["metrics"]["eval_rows"] == int(held.sum()) - 2
    assert ens.manifest["metrics"]["ensemble_accuracy"] == ref.manifest["metrics"]["ensemble_accuracy"]
    again = ens.delete(gone[:2])
    assert again.request_id is None and again.already_deleted == 2


def test_eval_only_deletion_retrains_nothing_and_is_audited(tmp_path):
    X, y, ids, held = world(n=240)
    ens = fit_arrays(tmp_path / "w", X, y, ids, held)
    ckpts = json.dumps([sh["checkpoints"] for sh in ens.manifest["shards"]], sort_keys=True)
    victim = str(ids[held][1])
    r = ens.delete(victim)
    assert r.shards == {} and r.rows_deleted == 0 and r.eval_rows_deleted == 1 and r.cost["sample_epochs"] == 0
    assert json.dumps([sh["checkpoints"] for sh in ens.manifest["shards"]], sort_keys=True) == ckpts, (
        "no shard was retrained"
    )
    assert r.request_id in ens.manifest["applied_requests"]
    assert [q["state"] for q in Ledger(ens.workdir.path / "ledger.db").requests()] == ["done"]
    assert victim not in np.load(ens.workdir.path / "eval.npy")["id"].tolist()
    assert ens.verify(r).ok


def test_eval_ids_must_not_repeat_training_ids(tmp_path):
    X, y, ids = tiny_data(n=120)
    with pytest.raises(DataError, match="unique across"):
        SisaEnsemble.from_config(tiny_config(), tmp_path / "w").fit(X, y, ids=ids, eval_set=(X[:5], y[:5], ids[:5]))
    assert not (tmp_path / "w" / "manifest.json").exists()


def test_eval_rows_without_ids_warn_and_cannot_be_named(tmp_path):
    X, y, ids = tiny_data(n=150)
    ens = SisaEnsemble.from_config(tiny_config(), tmp_path / "w")
    with pytest.warns(UserWarning, match="cannot name them, so they cannot be erased"):
        ens.fit(X[:120], y[:120], ids=ids[:120], eval_set=(X[120:], y[120:]))
    rows = np.load(tmp_path / "w" / "eval.npy")
    assert rows.dtype.names == ("y", "x"), "the format of a file without ids (and of older workdirs)"
    assert ens.manifest["metrics"]["eval_rows"] == 30
    with pytest.raises(UnknownIdsError, match="30 evaluation rows of this workdir were stored without ids"):
        ens.delete(["u-130"])
    r = ens.delete(["u-3"])  # training rows still go, and re-evaluation reads the old format
    assert r.rows_deleted == 1 and r.eval_rows_deleted == 0 and ens.manifest["metrics"]["eval_rows"] == 30


def test_audit_catches_an_erased_held_out_row_put_back(tmp_path):
    from shards.schema import encode_rows
    from sisa import evalfile

    X, y, ids, held = world()
    wd = tmp_path / "w"
    ens = fit_arrays(wd, X, y, ids, held)
    before = evalfile.read(wd)
    victim = str(ids[np.flatnonzero(held)[0]])
    receipt = ens.delete([victim])
    assert ens.verify().ok
    (wd / evalfile.NAME).write_bytes(encode_rows(before))  # the erased row restored into eval.npy
    msgs = [f"{c.target} | {c.detail}" for c in ens.verify().failures()]
    assert any("eval.npy holds 1 id(s) deleted by request(s) " + receipt.request_id in m for m in msgs), msgs


def test_the_superseded_evaluation_file_is_zeroed_not_just_unlinked(tmp_path):
    """A rename over eval.npy would leave the erased rows in the old inode's blocks; a second name for the
    old file (a hard link taken before the deletion) shows what became of those bytes."""
    import os

    X, y, ids, held = world()
    wd = tmp_path / "w"
    ens = fit_arrays(wd, X, y, ids, held)
    os.link(wd / "eval.npy", tmp_path / "old-eval.npy")
    ens.delete([str(ids[np.flatnonzero(held)[0]])])
    old = (tmp_path / "old-eval.npy").read_bytes()
    assert old and old == b"\0" * len(old)
    assert not (wd / ".eval-old.npy").exists()
