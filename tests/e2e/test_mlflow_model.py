"""The ensemble as a registered MLflow pyfunc model: `load_model(...).predict` equals `SisaEnsemble.predict`,
the `current` alias follows deletions, superseded versions are purged (also when the deleting process was
killed and the workdir is reopened), and nothing else in the store is."""

import signal

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from helpers import delete_killed_at, tiny_config, tiny_data
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient

from shards.errors import DataError
from sisa import SisaEnsemble


def _store_uri(monkeypatch, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    return MlflowClient(uri, registry_uri=uri)


def _model_id(version) -> str:
    return version.source.removeprefix("models:/")


def test_pyfunc_model_predicts_like_the_ensemble_and_follows_deletions(tmp_path, monkeypatch):
    X, y, ids = tiny_data(n=180)
    w = tmp_path / "w"
    ens = SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), w)
    ens.fit(X, y, ids=ids, eval_set=(X[:30], y[:30]))
    client = _store_uri(monkeypatch, f"sqlite:///{w / 'mlflow.db'}")
    name = ens._ctx.tracker().model_name
    v1 = client.get_model_version_by_alias(name, "current")
    fit_run = client.get_run(v1.run_id)
    assert fit_run.data.tags["sisa.operation"] == "fit"

    model = mlflow.pyfunc.load_model(f"models:/{name}@current")
    Xq = X[:60]
    assert np.array_equal(model.predict(Xq), ens.predict(Xq))
    assert np.array_equal(model.predict(pd.DataFrame(Xq.astype(np.float64))), ens.predict(Xq))
    assert np.array_equal(model.predict(Xq, params={"proba": True}), ens.predict_proba(Xq))
    with pytest.raises(DataError, match="trained on"):
        model.predict(Xq[:, :4])
    files = {f.path for f in client.list_logged_model_artifacts(_model_id(v1))}
    assert "MLmodel" in files and not {"input_example.json", "serving_input_example.json"} & files

    receipt = ens.delete(["u-3", "u-4", "u-100"])
    v2 = client.get_model_version_by_alias(name, "current")
    assert v2.version != v1.version
    assert client.get_run(v2.run_id).data.tags["sisa.request_id"] == receipt.request_id
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == [v2.version]
    with pytest.raises(MlflowException):
        client.get_logged_model(_model_id(v1))
    assert not (w / "mlartifacts" / "models" / _model_id(v1)).exists()
    model2 = mlflow.pyfunc.load_model(f"models:/{name}@current")
    assert np.array_equal(model2.predict(X), ens.predict(X))
    assert np.array_equal(model2.predict(X, params={"proba": True}), ens.predict_proba(X))

    # a reopened ensemble that publishes again does not log a duplicate version
    assert ens._ctx.tracker().publish((o := SisaEnsemble.open(w))._ctx, o.manifest, purge=True).version == v2.version
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


def test_purge_touches_only_this_ensembles_models(tmp_path, monkeypatch):
    """Two ensembles share one store with an unrelated, soft-deleted run (what a bare `mlflow gc` would
    destroy): deleting rows from ensemble A purges only A's superseded model."""
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    client = _store_uri(monkeypatch, uri)
    other_exp = client.create_experiment("someone-else", artifact_location=(tmp_path / "other").as_uri())
    bystander = client.create_run(other_exp, run_name="deleted-but-not-ours")
    client.log_text(bystander.info.run_id, "keep me", "note.txt")
    client.delete_run(bystander.info.run_id)

    X, y, ids = tiny_data(n=150)
    cfg = tiny_config(tracking={"enabled": True, "uri": uri})
    a = SisaEnsemble.from_config({**cfg, "name": "alpha"}, tmp_path / "a").fit(X, y, ids=ids)
    b = SisaEnsemble.from_config({**cfg, "name": "beta"}, tmp_path / "b").fit(X, y, ids=ids)
    name_a, name_b = a._ctx.tracker().model_name, b._ctx.tracker().model_name
    assert name_a != name_b
    old_a = client.get_model_version_by_alias(name_a, "current")
    keep_b = client.get_model_version_by_alias(name_b, "current")

    a.delete(["u-7"])
    store = SqlAlchemyStore(uri, str(tmp_path / "unused"))
    with pytest.raises(MlflowException):  # hard-deleted, not just marked deleted
        store.get_logged_model(_model_id(old_a), allow_deleted=True)
    assert client.get_model_version_by_alias(name_a, "current").version != old_a.version
    # ensemble B and the bystander are untouched
    assert client.get_model_version_by_alias(name_b, "current").version == keep_b.version
    assert client.get_logged_model(_model_id(keep_b)).model_id == _model_id(keep_b)
    assert (tmp_path / "b" / "mlartifacts" / "models" / _model_id(keep_b) / "artifacts" / "MLmodel").exists()
    assert client.get_run(bystander.info.run_id).info.lifecycle_stage == "deleted"
    assert (tmp_path / "other" / bystander.info.run_id / "artifacts" / "note.txt").exists()
    loaded = mlflow.pyfunc.load_model(f"models:/{name_b}@current")
    assert np.array_equal(loaded.predict(X), b.predict(X))


@pytest.mark.slow
def test_a_deletion_killed_after_the_swap_is_purged_from_mlflow_on_reopen(tmp_path, monkeypatch):
    X, y, ids = tiny_data(n=150)
    w = tmp_path / "w"
    ens = SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), w).fit(X, y, ids=ids)
    client = _store_uri(monkeypatch, f"sqlite:///{w / 'mlflow.db'}")
    name = ens._ctx.tracker().model_name
    v1 = client.get_model_version_by_alias(name, "current")
    res = delete_killed_at(w, ["u-9", "u-10"], "after_swap")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert client.get_model_version_by_alias(name, "current").version == v1.version  # not done yet

    reopened = SisaEnsemble.open(w, executor="inprocess")  # finishes the request, MLflow included
    v2 = client.get_model_version_by_alias(name, "current")
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == [v2.version] != [v1.version]
    assert not (w / "mlartifacts" / "models" / _model_id(v1)).exists()
    assert np.array_equal(mlflow.pyfunc.load_model(f"models:/{name}@current").predict(X), reopened.predict(X))
    # the dead process's deletion run is shown as KILLED, not running forever
    exp = client.get_experiment_by_name(ens._ctx.tracker().experiment).experiment_id
    runs = client.search_runs([exp], "tags.`sisa.operation` = 'delete'")
    dead = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in dead] == ["KILLED"] and "RUNNING" not in {r.info.status for r in runs}
