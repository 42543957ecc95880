"""Inputs are matched by name, never by position alone: CSV, Parquet and DataFrame columns at fit and predict."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_config, tiny_data

from shards.errors import DataError
from sisa import SisaEnsemble

CFG = tiny_config(training={"epochs": 2}, data={"source": "csv", "path": "d.csv", "test_fraction": 0.2})
FEATS = [f"f{k}" for k in range(6)]


def frame(n=300, seed=0):
    X, y, _ = tiny_data(n=n, seed=seed)
    df = pd.DataFrame(X, columns=FEATS)
    df.insert(0, "label", y)
    df.insert(0, "id", [f"u-{i}" for i in range(n)])
    return df


@pytest.fixture(scope="module")
def csv_ens(tmp_path_factory):
    wd = tmp_path_factory.mktemp("csv") / "w"
    wd.mkdir()
    frame().to_csv(wd / "d.csv", index=False)
    return SisaEnsemble.from_config(CFG, wd).fit()


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sisa.cli", *map(str, args)], capture_output=True, text=True)


def test_fit_records_the_feature_columns(csv_ens):
    assert csv_ens.manifest["feature_names"] == FEATS


def test_predict_matches_columns_by_name_not_position(csv_ens, tmp_path):
    df = frame(seed=1)
    expected = csv_ens.predict(df[FEATS].to_numpy(np.float32))
    shuffled = df[["f3", "label", "f0", "f5", "id", "f1", "f4", "f2"]]
    assert (csv_ens.predict(shuffled) == expected).all()
    assert (csv_ens.predict_proba(shuffled) == csv_ens.predict_proba(df[FEATS])).all()
    shuffled.to_csv(tmp_path / "x.csv", index=False)
    out = cli("predict", "--workdir", csv_ens.workdir.path, "--input", tmp_path / "x.csv")
    assert out.returncode == 0, out.stderr
    assert [int(v) for v in out.stdout.split()] == expected.tolist()  # 264 of 300 were wrong before
    shuffled.to_parquet(tmp_path / "x.parquet", index=False)
    out = cli("predict", "--workdir", csv_ens.workdir.path, "--input", tmp_path / "x.parquet")
    assert [int(v) for v in out.stdout.split()] == expected.tolist()


def test_missing_unknown_and_non_numeric_columns_are_clear_errors(csv_ens, tmp_path):
    df = frame(n=20, seed=2)
    with pytest.raises(DataError, match=r"missing \['f2'\]"):
        csv_ens.predict(df.drop(columns=["f2"]))
    with pytest.raises(DataError, match=r"unknown \['extra'\]"):
        csv_ens.predict(df.assign(extra=1.0))
    df.drop(columns=["f2"]).to_csv(tmp_path / "x.csv", index=False)
    out = cli("predict", "--workdir", csv_ens.workdir.path, "--input", tmp_path / "x.csv")
    assert out.returncode == 2 and "missing ['f2']" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(DataError, match="feature column 'f1' has type string"):
        csv_ens.predict(df.assign(f2=0.0, f1="a"))


def test_non_numeric_feature_column_at_fit_is_a_clear_error(tmp_path):
    wd = tmp_path / "w"
    wd.mkdir()
    frame(n=60).assign(f4="red").to_csv(wd / "d.csv", index=False)
    with pytest.raises(DataError, match="feature column 'f4' has type string.*encode it"):
        SisaEnsemble.from_config(CFG, wd).fit()


def test_dataframe_fit_records_names_and_drops_id_and_label_columns(tmp_path):
    df = frame(n=120)
    cfg = tiny_config(training={"epochs": 1})
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w").fit(df, df["label"].to_numpy(), ids=df["id"].to_numpy())
    assert ens.manifest["feature_names"] == FEATS and ens.manifest["input_shape"] == [6]
    assert (ens.predict(df[FEATS[::-1]]) == ens.predict(df[FEATS].to_numpy())).all()


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.array(["a"] * 30), "eval_set labels have dtype"),
        (np.full(30, 0.5), "eval_set labels hold fractional"),
        (np.full(30, 7), "eval_set labels go up to 7 but the ensemble has 3 classes"),
        (np.full(30, -1), "eval_set labels hold a negative value"),
        (np.zeros(29, int), "one label per row"),
    ],
)
def test_bad_eval_set_labels_are_clear_errors(tmp_path, labels, match):
    X, y, ids = tiny_data(n=120)
    with pytest.raises(DataError, match=match):
        SisaEnsemble.from_config(tiny_config(), tmp_path / "w").fit(X, y, ids=ids, eval_set=(X[:30], labels))
    assert not (tmp_path / "w" / "manifest.json").exists()


def test_parquet_fit_records_the_feature_columns(tmp_path):
    df = frame(n=120)[["id", "f2", "label", *[f for f in FEATS if f != "f2"]]]
    df.to_parquet(tmp_path / "d.parquet", index=False)
    ens = SisaEnsemble.from_config(tiny_config(training={"epochs": 1}), tmp_path / "w").fit(str(tmp_path / "d.parquet"))
    names = ens.manifest["feature_names"]
    assert names == ["f2", *[f for f in FEATS if f != "f2"]]
    assert (ens.predict(df[FEATS]) == ens.predict(df[names].to_numpy(np.float32))).all()


def test_registered_mlflow_model_matches_columns_by_name(tmp_path, monkeypatch):
    import mlflow.pyfunc

    df = frame(n=150)
    cfg = tiny_config(training={"epochs": 1}, tracking={"enabled": True})
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w").fit(df, df["label"].to_numpy(), ids=df["id"].to_numpy())
    uri = f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    model = mlflow.pyfunc.load_model(f"models:/{ens._ctx.tracker().model_name}@current")
    shuffled = df[["label", *FEATS[::-1], "id"]]
    assert (model.predict(shuffled) == ens.predict(df[FEATS].to_numpy(np.float32))).all()
    with pytest.raises(DataError, match=r"missing \['f0'\]"):
        model.predict(df[FEATS[1:]])
