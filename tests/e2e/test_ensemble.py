"""The Python API: fit returns self, predict, reopen in a new process, shard_of, and every bad input."""

import subprocess
import sys

import numpy as np
import pytest
from helpers import tiny_config, tiny_data

from sisa import SisaEnsemble
from sisa.errors import ConfigError, DataError, NotFittedError, WorkdirError


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    X, y, ids = tiny_data(n=240)
    wd = tmp_path_factory.mktemp("fitted") / "w"
    ens = SisaEnsemble.from_config(tiny_config(), wd)
    assert ens.fit(X, y, ids=ids) is ens
    return ens, X, y, ids


def test_predict_shapes_and_accuracy(fitted):
    ens, X, y, _ = fitted
    p = ens.predict_proba(X[:17])
    assert p.shape == (17, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert ens.predict(X[:17]).shape == (17,)
    assert (ens.predict(X) == y).mean() > 0.6


def test_reopen_in_new_process_predicts_identically(fitted, tmp_path):
    ens, X, _, _ = fitted
    np.save(tmp_path / "X.npy", X)
    code = (
        "import numpy as np, sys; from sisa import SisaEnsemble;"
        f"e = SisaEnsemble.open({str(ens.workdir.path)!r}); np.save(sys.argv[1], e.predict_proba(np.load({str(tmp_path / 'X.npy')!r})))"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.npy")], check=True, capture_output=True)
    assert np.array_equal(np.load(tmp_path / "p.npy"), ens.predict_proba(X))


def test_shard_of_matches_the_store(fitted):
    ens, _, _, ids = fitted
    from shards.store import read_slice

    s, j = ens.shard_of(ids[5])
    rows = read_slice(ens.storage(), ens.manifest["shards"][s]["slices"][j])
    assert ids[5] in rows["id"].tolist()
    # every stored id sits exactly where shard_of says, once (none missing, none in a second slice)
    where = [
        (i, (s, j))
        for s, sh in enumerate(ens.manifest["shards"])
        for j, e in enumerate(sh["slices"])
        for i in read_slice(ens.storage(), e)["id"].tolist()
    ]
    assert sorted(i for i, _ in where) == sorted(ids.tolist())
    assert all(ens.shard_of(i) == at for i, at in where)


def test_status_reports_shards_slices_and_accuracy(fitted):
    st = fitted[0].status()
    assert len(st["shards"]) == 3 and all(len(s["slice_rows"]) == 3 and s["checkpoints"] == 3 for s in st["shards"])
    assert st["rows"] == 240


def test_using_before_fit_says_what_to_call(tmp_path):
    ens = SisaEnsemble.from_config(tiny_config(), tmp_path / "new")
    with pytest.raises(NotFittedError, match=r"call \.fit\(X, y"):
        ens.predict(np.zeros((1, 6)))
    with pytest.raises(WorkdirError, match="no trained ensemble"):
        SisaEnsemble.open(tmp_path / "new")


def test_fitted_workdir_suggests_open(fitted):
    ens = SisaEnsemble.from_config(tiny_config(), fitted[0].workdir.path)
    with pytest.raises(NotFittedError, match="SisaEnsemble.open"):
        ens.predict(fitted[1][:2])
    with pytest.raises(WorkdirError, match="already holds a trained ensemble"):
        ens.fit(*fitted[1:3], ids=fitted[3])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda X, y, i: (X[:, :, None][:0], y[:0], i[:0]), "empty"),
        (lambda X, y, i: (X, y[:-1], i), "one label per row"),
        (lambda X, y, i: (X, y.astype(float) + 0.5, i), "integer class indices"),
        (lambda X, y, i: (X, y, np.concatenate([i[:-1], i[:1]])), "must be unique"),
        (lambda X, y, i: (np.where(np.arange(len(X))[:, None] == 4, np.nan, X), y, i), "NaN"),
        (lambda X, y, i: (X[:5], y[:5], i[:5]), "fewer than shards x slices"),
        (lambda X, y, i: (X[:, 0], y, i), r"shape \(n_rows"),
        (lambda X, y, i: (X, y, i[:-3]), "one id per row"),
        (lambda X, y, i: (X, -y, i), "integer class indices"),
    ],
    ids=["empty", "labels-length", "float-labels", "dup-ids", "nan", "too-few", "1d", "ids-length", "negative"],
)
def test_bad_training_data_is_rejected_and_nothing_written(tmp_path, data, mutate, match):
    X, y, ids = mutate(*data)
    wd = tmp_path / "w"
    with pytest.raises(DataError, match=match):
        SisaEnsemble.from_config(tiny_config(), wd).fit(X, y, ids=ids)
    assert not (wd / "manifest.json").exists()
    assert not (wd / "store").exists() or not any(p.is_file() for p in (wd / "store").rglob("*"))


def test_unknown_model_path_fails_cleanly(tmp_path, data):
    wd = tmp_path / "w"
    with pytest.raises(ConfigError, match="cannot be imported"):
        SisaEnsemble.from_config(tiny_config(model={"name": "nowhere.models:Net"}), wd).fit(*data[:2], ids=data[2])
    assert not (wd / "manifest.json").exists() and not any(p.is_file() for p in (wd / "store").rglob("*"))


def test_wrong_feature_shape_at_predict(fitted):
    with pytest.raises(DataError, match="trained on"):
        fitted[0].predict(np.zeros((2, 7), np.float32))


def test_incompatible_config_is_detected_on_open(fitted, tmp_path):
    import shutil

    wd = tmp_path / "copy"
    shutil.copytree(fitted[0].workdir.path, wd)
    text = (wd / "config.yaml").read_text().replace("lr: 0.01", "lr: 0.02")
    (wd / "config.yaml").write_text(text)
    with pytest.raises(WorkdirError, match="does not match the config"):
        SisaEnsemble.open(wd)


def test_cnn_on_images_and_user_module_by_import_path(tmp_path):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16).reshape(-1, 8, 8).astype(np.float32)[:300]
    y = y[:300]
    cnn = tiny_config(model={"name": "cnn", "kwargs": {"channels": [4, 8]}}, training={"epochs": 2})
    ens = SisaEnsemble.from_config(cnn, tmp_path / "cnn").fit(X, y)
    assert ens.predict_proba(X[:3]).shape == (3, 10)
    user = tiny_config(model={"name": "usermodel:TinyNet", "kwargs": {"width": 8}}, training={"epochs": 2})
    ens2 = SisaEnsemble.from_config(user, tmp_path / "user").fit(X.reshape(300, -1), y)
    assert ens2.predict(X[:4].reshape(4, -1)).shape == (4,)
    assert type(ens2.load_shard_model(0)).__name__ == "TinyNet"


def test_aggregation_majority_vote_and_weights(fitted):
    from sisa.aggregate import Aggregator, decide

    ens, X, _, _ = fitted
    mods = {s: ens.load_shard_model(s) for s in ens.active_shards()}
    vote = Aggregator(mods, 3, "majority_vote").predict_proba(X[:50])
    assert np.allclose(vote.sum(1), 1) and set(np.unique(vote * 3).round(4)) <= {0, 1, 2, 3}
    only0 = Aggregator(mods, 3, "mean_proba", weights=[1, 0, 0]).predict_proba(X[:50])
    single = Aggregator({0: mods[0]}, 3).predict_proba(X[:50])
    assert np.allclose(only0, single, atol=1e-6)
    assert decide(np.array([[0.5, 0.5, 0.0], [0.2, 0.4, 0.4]])).tolist() == [0, 1], "ties go to the lowest class"
    fused = Aggregator(mods, 3)
    loop = Aggregator(mods, 3)
    loop._fused = None
    assert fused._fused is not None and np.allclose(fused.predict_proba(X), loop.predict_proba(X), atol=1e-6)
