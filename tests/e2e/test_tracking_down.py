"""Tracking is an observer: MLflow being down never blocks a deletion from taking effect. The new models
serve at once; only the MLflow model purge (part of erasure) is left, and the request finishes on reopen
once MLflow answers again."""

import warnings

import numpy as np
import pytest
from helpers import tiny_config, tiny_data, weights_equal

from sisa import SisaEnsemble
from sisa.ledger import Ledger


@pytest.fixture
def mlflow_fails_fast(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


def test_mlflow_down_during_a_deletion(tmp_path, mlflow_fails_fast):
    X, y, ids = tiny_data(n=150)
    wd = tmp_path / "w"
    SisaEnsemble.from_config(tiny_config(tracking={"enabled": True}), wd).fit(X, y, ids=ids)
    down = SisaEnsemble.open(wd, tracking_uri="http://127.0.0.1:9")  # nothing listens on the discard port
    with warnings.catch_warnings(record=True) as seen, pytest.raises(Exception):  # noqa: B017 - MLflow's own error
        warnings.simplefilter("always")
        down.delete(["u-3", "u-77"])
    assert any("MLflowObserver failed" in str(w.message) for w in seen), [str(w.message) for w in seen]
    m = down.manifest
    assert not any(sh.excluded for sh in m.shards), "the retrained shards serve although MLflow is down"
    assert m.applied_requests and Ledger(wd / "ledger.db").unfinished(), "the MLflow purge is still owed"

    back = SisaEnsemble.open(wd)  # MLflow answers again: reopening finishes the request
    assert Ledger(wd / "ledger.db").unfinished() == []
    keep = ~np.isin(ids, ["u-3", "u-77"])
    ref = SisaEnsemble.from_config(wd / "config.yaml", tmp_path / "ref").fit(X[keep], y[keep], ids=ids[keep])
    assert weights_equal(back, ref)
