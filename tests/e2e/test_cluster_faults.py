"""Worker failures on real Ray: a node lost mid-training and mid-deletion (multi-node cluster on one
machine), and a transient task failure; the results equal fault-free runs bit for bit."""

import json
import os
import subprocess
import sys

import pytest
from helpers import TESTS, tiny_config, tiny_data, weights_equal

from sisa import SisaEnsemble
from sisa.errors import ShardTrainingError

HERE = TESTS


def _result(script: str) -> dict:
    """Run a multi-node scenario (tests/<script>) in its own process; the JSON it prints on its RESULT line."""
    res = subprocess.run(
        [sys.executable, str(HERE / script)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(line[0][7:])


@pytest.mark.slow
def test_node_lost_mid_training_and_mid_deletion():
    out = _result("cluster_faults.py")
    assert out["fit_nodes_lost"] == 1 and out["delete_nodes_lost"] == 1, out
    assert out["fit_workers_lost"] >= 1 and out["delete_workers_lost"] >= 1, f"a stage was interrupted: {out}"
    assert out["fit_equal"] and out["delete_equal"] and out["joined_address"], out


@pytest.mark.slow
def test_node_lost_mid_ingest_gives_the_same_files():
    """A node dies while Ray Data ingest units run on it (tests/ingest_faults.py): Ray re-runs them and the
    slice files, held-out rows and records equal the single-process ingest's."""
    out = _result("ingest_faults.py")
    assert "error" not in out, out
    assert out["killed_at_run"] < out["units"] and out["runs_on_killed_node"] >= 1, f"killed mid-ingest: {out}"
    assert out["runs"] > out["units"], f"a unit was re-run: {out}"
    assert out["records_equal"] and out["files_equal"] and out["eval_equal"], out


def test_transient_task_failure_is_retried(tmp_path, ray_session):
    X, y, ids = tiny_data(n=120)
    base = tiny_config(sharding={"shards": 2, "slices": 2}, cluster={"executor": "ray", "max_retries": 2})
    flaky = {**base, "model": {"name": "flaky_model:FlakyNet", "kwargs": {"marker": str(tmp_path / "m1")}}}
    ens = SisaEnsemble.from_config(flaky, tmp_path / "a").fit(X, y, ids=ids)
    (tmp_path / "m2").touch()  # never fails
    clean = {**base, "model": {"name": "flaky_model:FlakyNet", "kwargs": {"marker": str(tmp_path / "m2")}}}
    ref = SisaEnsemble.from_config(clean, tmp_path / "b", executor="inprocess").fit(X, y, ids=ids)
    assert (tmp_path / "m1").exists() and weights_equal(ens, ref)


def test_dead_worker_process_is_replaced(tmp_path, ray_session):
    X, y, ids = tiny_data(n=120)
    cfg = tiny_config(
        sharding={"shards": 2, "slices": 2},
        cluster={"executor": "ray"},
        model={"name": "flaky_model:FlakyNet", "kwargs": {"marker": str(tmp_path / "k"), "kill": True}},
    )
    ens = SisaEnsemble.from_config(cfg, tmp_path / "a").fit(X, y, ids=ids)
    assert ens.predict(X).shape == (120,)


def test_a_failure_that_persists_names_the_shard(tmp_path):
    X, y, ids = tiny_data(n=120)
    cfg = tiny_config(
        sharding={"shards": 2, "slices": 2},
        model={"name": "flaky_model:FlakyNet", "kwargs": {"marker": str(tmp_path / "no-such-dir" / "m")}},
    )
    with pytest.raises(ShardTrainingError, match="shard 0 failed at stage 1") as e:
        SisaEnsemble.from_config(cfg, tmp_path / "a").fit(X, y, ids=ids)
    assert e.value.shard == 0 and e.value.stage == 1
    import pickle

    again = pickle.loads(pickle.dumps(e.value))
    assert again.shard == 0 and "shard 0" in str(again)
