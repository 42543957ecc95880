"""A frozen encoder (``model.encoder: base``): the start's body, its features computed once per row into the
slices, heads trained per shard. Exactness of delete and add (both executors), no byte of an erased row's
features left, predict = encoder then aggregated heads, the audit's checks, and clear refusals."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import scan, tiny_config, tiny_data, weights_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shards import encoder as encodermod
from sisa import SisaEnsemble
from sisa.cli.render import status_table
from sisa.config import load_config
from sisa.errors import ConfigError, IntegrityError

GONE = ["u-3", "u-10", "u-77"]
ENCODER = {"model": {"name": "mlp", "kwargs": {"hidden": [16], "dropout": 0.1}, "encoder": "base"}}


def base_data(n=60):
    X, y, _ = tiny_data(n=n, seed=1)
    return X, y, np.array([f"b-{i}" for i in range(n)])


def fit(path, X, y, ids, base=None, executor="inprocess", eval_set=None, **over):
    cfg = tiny_config(**{**ENCODER, **over})
    return SisaEnsemble.from_config(cfg, path, executor=executor).fit(X, y, ids=ids, base=base, eval_set=eval_set)


def features(ens, X) -> np.ndarray:
    return encodermod.encode(ens._ctx.encoder(ens.manifest), X)


def test_delete_with_encoder_equals_refit_without_the_rows(tmp_path):
    X, y, ids = tiny_data()
    Xe, ye, _ = tiny_data(n=60, seed=2)
    a = fit(tmp_path / "a", X, y, ids, base=base_data(), eval_set=(Xe, ye))
    m = a.manifest
    assert m.encoder is not None and m.encoder.width == 16 and m.encoder.file != m.base.file
    assert a.load_shard_model(0).net.layers[1].in_features == 16  # the shards are heads on the features
    assert a.status()["encoder"] == m.encoder.to_dict()
    assert f"frozen encoder {m.encoder.sha256[:12]}" in status_table(a.status())
    encoder_file = (tmp_path / "a" / "store" / m.encoder.file).read_bytes()
    a.delete(GONE)
    keep = ~np.isin(ids, GONE)
    b = fit(tmp_path / "b", X[keep], y[keep], ids[keep], base=base_data(), eval_set=(Xe, ye))
    assert weights_equal(a, b)
    assert a.manifest.encoder == m.encoder and a.manifest.base == m.base  # never retrained
    assert (tmp_path / "a" / "store" / m.encoder.file).read_bytes() == encoder_file
    assert np.array_equal(a.predict_proba(Xe), b.predict_proba(Xe))
    assert a.manifest.metrics["ensemble_accuracy"] == b.manifest.metrics["ensemble_accuracy"]
    plain = SisaEnsemble.from_config(tiny_config(), tmp_path / "p").fit(X[keep], y[keep], ids=ids[keep], base=base_data())
    assert not weights_equal(a, plain)  # the encoder does change the models


def test_a_pretrained_start_alone_gives_the_encoder(tmp_path):
    """model.init without base rows: the encoder is the pretrained model's body."""
    X, y, ids = tiny_data(n=120)
    donor = SisaEnsemble.from_config(tiny_config(sharding={"shards": 1, "slices": 1}), tmp_path / "d").fit(X, y, ids=ids)
    path = tmp_path / "init.pt"
    torch.save(donor.load_shard_model(0).state_dict(), path)
    init = {"uri": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    over = {"model": {**ENCODER["model"], "init": init}, "sharding": {"shards": 2, "slices": 2}}
    a = fit(tmp_path / "a", X, y, ids, **over)
    assert a.manifest.encoder is not None and a.manifest.base.init_sha256 == init["sha256"]
    body = donor.load_shard_model(0).net.layers[:-1].eval()
    with torch.no_grad():
        assert torch.equal(a._ctx.encoder(a.manifest)(torch.from_numpy(X[:9])), body(torch.from_numpy(X[:9])))
    a.delete(GONE)
    keep = ~np.isin(ids, GONE)
    assert weights_equal(a, fit(tmp_path / "b", X[keep], y[keep], ids[keep], **over))


def test_ray_delete_with_encoder_equals_inprocess_refit(tmp_path, ray_session):
    X, y, ids = tiny_data(n=120)
    over = {"sharding": {"shards": 2, "slices": 2}}
    a = fit(tmp_path / "a", X, y, ids, base=base_data(30), executor="ray", **over)
    a.delete(GONE)
    keep = ~np.isin(ids, GONE)
    assert weights_equal(a, fit(tmp_path / "b", X[keep], y[keep], ids[keep], base=base_data(30), **over))


@pytest.mark.slow
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_any_sequence_with_encoder_equals_a_fit_of_the_live_rows(data):
    """Random deletions and additions with a frozen encoder: the ensemble stays, bit for bit, the fit of the
    live rows (every row encoded alone, so an added row's features are those a fit computes), and the
    audit's fresh-process retrain agrees."""
    X, y, ids = tiny_data(n=160)
    over = {"sharding": {"shards": 2, "slices": 2}, "training": {"epochs": 2}, "data": {"test_fraction": 0.0}}
    live, erased = set(range(120)), set()  # rows 120.. are the pool that additions draw from
    with tempfile.TemporaryDirectory() as d:
        ens = fit(Path(d) / "w", X[:120], y[:120], ids[:120], base=base_data(20), **over)
        encoder = ens.manifest.encoder
        for _ in range(data.draw(st.integers(1, 3))):
            if data.draw(st.booleans()):
                gone = data.draw(st.lists(st.sampled_from(sorted(live)), min_size=1, max_size=5, unique=True))
                ens.delete(list(ids[gone]))
                live -= set(gone)
                erased |= set(gone)
                continue
            new = data.draw(st.lists(st.sampled_from(range(120, 160)), min_size=1, max_size=5, unique=True))
            new = [i for i in new if i not in live]
            if new:
                ens.add(X[new], y[new], ids=list(ids[new]), readmit=[ids[i] for i in new if i in erased] or None)
                live |= set(new)
        rows = sorted(live)
        assert ens.manifest.encoder == encoder
        assert weights_equal(ens, fit(Path(d) / "ref", X[rows], y[rows], ids[rows], base=base_data(20), **over))
        assert ens.verify().ok


def test_an_erased_rows_features_leave_no_byte_behind(tmp_path):
    X, y, ids = tiny_data()
    ens = fit(tmp_path / "w", X, y, ids, base=base_data())
    gone = np.isin(ids, GONE)
    F = features(ens, X[gone])
    needles = [f.tobytes() for f in F] + [x.tobytes() for x in X[gone]]
    store = tmp_path / "w" / "store"
    # the slices hold each row's features, bit for bit as encoded one row at a time; never the raw row
    assert {n for _, n in scan(store, needles)} == {f.tobytes() for f in F}
    assert not scan(store, [x.tobytes() for x in X])
    ens.delete(GONE)
    assert scan(tmp_path / "w", needles) == []
    assert ens.verify().ok


def test_predict_is_the_encoder_then_the_aggregated_heads(tmp_path):
    X, y, ids = tiny_data()
    ens = fit(tmp_path / "w", X, y, ids, base=base_data())
    enc = ens._ctx.encoder(ens.manifest)
    with torch.no_grad():
        F = enc(torch.from_numpy(X[:50]))
        want = torch.stack([ens.load_shard_model(s)(F).softmax(-1) for s in ens.active_shards()]).mean(0)
    assert np.allclose(ens.predict_proba(X[:50]), want.numpy(), atol=1e-6)
    again = SisaEnsemble.open(tmp_path / "w", executor="inprocess")
    assert np.array_equal(again.predict_proba(X[:50]), ens.predict_proba(X[:50]))


@pytest.mark.parametrize("user", [False, True])
def test_the_registered_model_is_the_encoder_then_the_heads(tmp_path, user):
    """With MLflow on: the pyfunc model carries the encoder (the start's body, or a user's module by import
    path; digest-bound), predicts like the ensemble, follows a deletion, and the audit checks the published
    encoder against the deployed one."""
    import mlflow.pyfunc

    from sisa.tracking import adapter
    from sisa.tracking.pyfunc import load_model

    X, y, ids = tiny_data(n=120)
    w = tmp_path / "w"
    over = {"sharding": {"shards": 2, "slices": 2}, "tracking": {"enabled": True}}
    if user:
        over["model"] = {"name": "mlp", "kwargs": {"hidden": [8]}, "encoder": user_encoder(tmp_path)}
    ens = fit(w, X, y, ids, base=base_data(30), **over)
    uri = f"sqlite:///{w / 'mlflow.db'}"
    name = ens._ctx.tracker().model_name
    model = load_model(f"models:/{name}@current", uri)
    assert np.array_equal(model.predict(X[:40], params={"proba": True}), ens.predict_proba(X[:40]))
    ens.delete(GONE)
    model = load_model(f"models:/{name}@current", uri)
    assert np.array_equal(model.predict(X[:40]), ens.predict(X[:40]))
    assert ens.verify().ok
    client = adapter.client(uri)  # a copy of the artifact with the encoder's tensors changed is refused
    (tmp_path / "dl").mkdir()
    local = Path(adapter.download(client, uri, client.get_model_version_by_alias(name, "current"), str(tmp_path / "dl")))
    path = local / "data" / "ensemble" / "shards" / "encoder.pt"
    torch.save({k: v + 1 for k, v in torch.load(path, weights_only=True).items()}, path)
    with pytest.raises(IntegrityError, match="sha256"):
        mlflow.pyfunc.load_model(str(local))


def test_a_swapped_encoder_is_refused(tmp_path):
    X, y, ids = tiny_data(n=120)
    fit(tmp_path / "w", X, y, ids, base=base_data(30), sharding={"shards": 2, "slices": 2}).close()
    ens = SisaEnsemble.open(tmp_path / "w", executor="inprocess")
    path = tmp_path / "w" / "store" / ens.manifest.encoder.file
    data = bytearray(path.read_bytes())
    data[-40] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256|corrupt"):
        ens.predict(X[:3])
    assert not ens.verify().ok


def test_encoder_without_a_start_is_refused_and_nothing_is_written(tmp_path):
    X, y, ids = tiny_data()
    with pytest.raises(ConfigError, match="model.encoder: base is the body of the start.*pass base data"):
        fit(tmp_path / "w", X, y, ids)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"model": {"name": "cnn", "encoder": "base"}}, "needs model.name: mlp with at least one hidden layer"),
        ({"model": {"kwargs": {"hidden": []}, "encoder": "base"}}, "at least one hidden layer"),
        ({**ENCODER, "sharding": {"shards": 2, "slices": 2, "new_rows": "append"}}, "new_rows: canonical only"),
        ({"model": {"encoder": "body"}}, "model.encoder"),
    ],
)
def test_encoder_config_is_checked(over, match):
    with pytest.raises(ConfigError, match=match):
        load_config(tiny_config(**over))


# -- a user's encoder by import path ---------------------------------------------------------------------
def user_encoder(tmp_path) -> dict:
    """The test encoder's weights, saved as a plain state dict file, and its config entry."""
    from userencoder import make

    torch.manual_seed(5)
    path = tmp_path / "encoder.pt"
    torch.save(make((6,)).state_dict(), path)
    return {"module": "userencoder:make", "uri": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


@pytest.mark.parametrize("with_base", [False, True])
def test_a_user_encoder_delete_equals_refit(tmp_path, with_base):
    """Its weights are checked and kept in the store; the slices hold its features; without base data
    each shard's model (the head) starts fresh, with base data from the head trained on their features."""
    X, y, ids = tiny_data(n=120)
    enc = user_encoder(tmp_path)
    over = {"model": {"name": "mlp", "kwargs": {"hidden": [8]}, "encoder": enc}, "sharding": {"shards": 2, "slices": 2}}
    B = base_data(30) if with_base else None
    a = fit(tmp_path / "a", X, y, ids, base=B, **over)
    m = a.manifest
    assert m.encoder.module == "userencoder:make" and m.encoder.width == 5 and m.encoder.sha256 == enc["sha256"]
    assert (m.base is not None) == with_base
    assert a.load_shard_model(0).net.layers[1].in_features == 5
    body = a._ctx.encoder(m)
    F = features(a, X[np.isin(ids, GONE)])
    assert {n for _, n in scan(tmp_path / "a" / "store", [f.tobytes() for f in F])} == {f.tobytes() for f in F}
    with torch.no_grad():
        want = torch.stack([a.load_shard_model(s)(body(torch.from_numpy(X[:20]))).softmax(-1) for s in (0, 1)])
    assert np.allclose(a.predict_proba(X[:20]), want.mean(0).numpy(), atol=1e-6)
    a.delete(GONE)
    assert scan(tmp_path / "a", [f.tobytes() for f in F]) == []
    keep = ~np.isin(ids, GONE)
    assert weights_equal(a, fit(tmp_path / "b", X[keep], y[keep], ids[keep], base=B, **over))
    assert a.verify().ok


def test_a_user_encoder_is_checked_before_anything_is_written(tmp_path):
    X, y, ids = tiny_data(n=120)
    enc = user_encoder(tmp_path)
    cases = [
        ({**enc, "sha256": "0" * 64}, IntegrityError, "sha256 is .* but model.encoder.sha256 says 0000"),
        ({**enc, "module": "userencoder:nothing"}, ConfigError, "cannot be imported"),
        ({"module": "userencoder:flat"}, ConfigError, r"must return features of shape \(batch, width\)"),
    ]
    for e, kind, match in cases:
        with pytest.raises(kind, match=match):
            fit(tmp_path / "w", X, y, ids, model={"name": "mlp", "encoder": e})
        assert not (tmp_path / "w").exists()
    with pytest.raises(ConfigError, match="uri and sha256 together"):
        load_config(tiny_config(model={"encoder": {"module": "userencoder:make", "uri": enc["uri"]}}))


def test_membership_audit_is_refused_with_an_encoder(tmp_path):
    from sisa.audit.mia import membership_audit

    X, y, ids = tiny_data(n=120)
    ens = fit(tmp_path / "w", X, y, ids, base=base_data(30), sharding={"shards": 2, "slices": 2})
    with pytest.raises(ConfigError, match="membership audit does not yet support model.encoder"):
        membership_audit(ens._ctx, ens.manifest, (X[:5], y[:5]))
