"""The frozen encoder's guards: `sisa status` names a user's module, features that are not finite are
refused before anything is written, a damaged start or encoder file is reported as unrepairable, and a
user's module whose code changed since fit (same import path, same weights) is refused everywhere it is
loaded (`shards.encoder.probe`), while the registered model builds it under the workdir's seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import userencoder
from helpers import tiny_config, tiny_data

from shards import encoder as encodermod
from sisa import SisaEnsemble
from sisa.cli.render import status_table
from sisa.errors import DataError, IntegrityError
from sisa.manifest import Encoder

SMALL = {"sharding": {"shards": 2, "slices": 2}, "training": {"epochs": 2}}
CHANGED = "the encoder module behaves differently than at fit: restore its code or refit"


def fit(path, X, y, ids, encoder, base=None, **over):
    model = {"name": "mlp", "kwargs": {"hidden": [8]}, "encoder": encoder}
    cfg = tiny_config(**{**SMALL, "model": model, **over})
    return SisaEnsemble.from_config(cfg, path, executor="inprocess").fit(X, y, ids=ids, base=base)


def files(root) -> dict:
    """Every file but the lock and the ledger (which `add` opens, empty, before it reads the rows)."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.name.startswith(("LOCK", "ledger"))}


def test_status_names_a_user_encoder_without_weights(tmp_path):
    X, y, ids = tiny_data(n=60)
    ens = fit(tmp_path / "w", X, y, ids, {"module": "userencoder:make"})
    line = [x for x in status_table(ens.status()).splitlines() if "frozen encoder" in x]
    assert line == ["frozen encoder userencoder:make (no weights): shards train heads on 5 features"]


def test_an_encoder_with_nan_features_is_refused_before_anything_is_written(tmp_path):
    X, y, ids = tiny_data(n=80)
    X[7, 2] = -20.0  # a finite row the encoder maps to NaN
    with pytest.raises(
        DataError, match=r"model.encoder produced NaN or inf features for 1 of the training rows \(first at row 7\)"
    ):
        fit(tmp_path / "w", X, y, ids, {"module": "userencoder:SqrtShift"})
    assert not (tmp_path / "w").exists()
    X[7, 2] = 0.0
    ens = fit(tmp_path / "w", X, y, ids, {"module": "userencoder:SqrtShift"})
    before, m = files(tmp_path / "w"), ens.manifest
    Xn, yn, _ = tiny_data(n=4, seed=5)
    Xn[2, 0] = -30.0
    with pytest.raises(DataError, match=r"NaN or inf features for 1 of the new rows \(first at row 2\)") as e:
        ens.add(Xn, yn, ids=[f"n-{i}" for i in range(4)])
    assert "n-2" not in str(e.value) and "-30" not in str(e.value)
    assert files(tmp_path / "w") == before and ens.manifest == m  # nothing staged
    assert ens.status()["additions"] == {"done": 0, "unfinished": 0}  # nothing acknowledged


@pytest.mark.parametrize("which", ["encoder", "start", "rows"])
def test_a_damaged_start_or_encoder_is_unrepairable(tmp_path, which):
    X, y, ids = tiny_data(n=80)
    Xb, yb, _ = tiny_data(n=20, seed=1)
    base = (Xb, yb, np.array([f"b-{i}" for i in range(20)]))
    ens = fit(
        tmp_path / "w",
        X,
        y,
        ids,
        "base",
        base=base,
        model={"name": "mlp", "kwargs": {"hidden": [8]}, "encoder": "base"},
    )
    m = ens.manifest
    rel = {"encoder": m.encoder.file, "start": m.base.file, "rows": m.base.rows_file.file}[which]
    path = tmp_path / "w" / "store" / rel
    data = bytearray(path.read_bytes())
    data[-40] ^= 1
    path.write_bytes(bytes(data))
    if which == "start":  # a lost stage-1 checkpoint is not rebuilt from a damaged start
        (tmp_path / "w" / "store" / m.shards[1].checkpoints[0].file).unlink()
    ens.close()
    ens = SisaEnsemble.open(tmp_path / "w", executor="inprocess")
    assert ens.repair() == {"repaired": {}, "unrepairable": [str(path)]}
    if which != "rows":
        with pytest.raises(IntegrityError, match="cannot be rebuilt: restore it from a backup or refit"):
            ens.add(X[:2] + 1, y[:2], ids=["n-1", "n-2"]) if which == "encoder" else ens.delete(["u-3"])


def test_encoder_records_are_optional_in_older_manifests():
    old = {"file": None, "sha256": None, "width": 5, "module": "userencoder:make"}
    assert Encoder.from_dict(old).probe is None and "probe" not in Encoder.from_dict(old).to_dict()
    new = Encoder.from_dict({**old, "probe": "ab" * 32})
    assert Encoder.from_dict(new.to_dict()) == new
    encodermod.check_probe(userencoder.make((6,)), (6,), None, "userencoder:make")  # nothing recorded: no check


def test_a_changed_user_encoder_is_refused_and_the_registered_model_uses_the_seed(tmp_path, monkeypatch):
    """RandProj is drawn at construction: the registered model equals the ensemble only when it is built
    under the workdir's seed. Then its code 'changes' (ACT swapped): same import path, no weights."""
    from sisa.tracking.pyfunc import load_model

    X, y, ids = tiny_data(n=80)
    w = tmp_path / "w"
    ens = fit(w, X, y, ids, {"module": "userencoder:RandProj"}, tracking={"enabled": True}, seed=11)
    uri, name = f"sqlite:///{w / 'mlflow.db'}", ens._ctx.tracker().model_name
    model = load_model(f"models:/{name}@current", uri)
    assert np.array_equal(model.predict(X[:30], params={"proba": True}), ens.predict_proba(X[:30]))
    probe = ens.manifest.encoder.probe
    assert probe == encodermod.probe(ens._ctx.encoder(ens.manifest), (6,)) and len(probe) == 64
    metas = [json.loads(p.read_text()) for p in w.rglob("ensemble.json")]
    assert metas and all(m["encoder"]["probe"] == probe and m["encoder"]["seed"] == 11 for m in metas)
    ens.close()
    monkeypatch.setattr(userencoder, "ACT", torch.relu)
    again = SisaEnsemble.open(w, executor="inprocess")
    for op in (lambda: again.predict(X[:3]), lambda: again.add(X[:2] + 1, y[:2], ids=["n-1", "n-2"])):
        with pytest.raises(IntegrityError, match=CHANGED):
            op()
    with pytest.raises(IntegrityError, match=CHANGED):
        load_model(f"models:/{name}@current", uri)
    report = again.verify()
    assert not report.ok and any(c.target == "encoder" and not c.ok for c in report.checks)
    assert json.loads((w / "manifest.json").read_text())["encoder"]["probe"] == probe
