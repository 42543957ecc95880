"""Availability while a deletion runs: a deletion that retrains every shard leaves no shard to answer.
`predict` then waits (``wait_timeout``) for the new models, following the manifest on disk, or raises
`RetrainingError` naming the request and its expected remaining time; it never says to refit a healthy
ensemble. A deletion whose process died is reported as such at once."""

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from helpers import REPO, tiny_config, tiny_data

from sisa import SisaEnsemble
from sisa.errors import RetrainingError, SisaError

ROOT = REPO
CFG = tiny_config(sharding={"shards": 2, "slices": 2})


def every_shard(ens, ids):
    """One id in each shard: a deletion of these retrains every shard."""
    return [next(i for i in ids.tolist() if ens.shard_of(i)[0] == s) for s in range(CFG["sharding"]["shards"])]


def in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # reported by the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_predict_waits_for_the_retrained_shards_or_names_the_request(tmp_path):
    X, y, ids = tiny_data(n=160)
    wd = tmp_path / "w"
    SisaEnsemble.from_config(CFG, wd).fit(X, y, ids=ids)
    impatient = SisaEnsemble.open(wd, executor="inprocess", wait_timeout=0.3)
    patient = SisaEnsemble.open(wd, executor="inprocess", wait_timeout=120)
    before = patient.predict_proba(X)
    deleter = SisaEnsemble.open(wd, executor="inprocess")
    gone = every_shard(deleter, ids)
    seen = {}

    def during(plan, entry, metrics):
        if seen:
            return
        assert deleter.manifest.get("retraining"), "the exclusion names the request"
        t, out = in_thread(lambda: impatient.predict(X))  # another thread, its own SisaEnsemble
        t.join(30)
        seen["impatient"] = out
        t, out = in_thread(lambda: SisaEnsemble.open(wd, executor="inprocess", wait_timeout=0).predict(X))
        t.join(30)
        assert not t.is_alive(), "open() does not block on a deletion another thread is running"
        seen["opened"] = out
        seen["patient"] = in_thread(lambda: patient.predict_proba(X))  # blocks until the swap

    receipt = deleter.delete(gone, progress=during)
    t, patient_out = seen["patient"]
    t.join(60)
    assert not t.is_alive() and "error" not in patient_out, patient_out
    after = SisaEnsemble.open(wd, executor="inprocess").predict_proba(X)
    assert not np.array_equal(before, after)
    assert np.array_equal(patient_out["value"], after), "the waiting caller got the new models' answer"

    for key in ("impatient", "opened"):
        err = seen[key].get("error")
        assert isinstance(err, RetrainingError), f"{key}: {seen[key]}"
        assert err.request_id == receipt.request_id and err.running and err.shards == [0, 1]
        assert err.remaining_seconds is not None and err.remaining_seconds >= 0
        assert "refit" not in str(err) and receipt.request_id in str(err)
    err = seen["impatient"]["error"]
    assert 0.25 <= err.waited < 10
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, RetrainingError) and isinstance(back, SisaError)
    assert back.detail == err.detail and str(back) == str(err)


def test_a_second_process_keeps_predicting_through_a_deletion_of_every_shard(tmp_path):
    X, y, ids = tiny_data(n=160)
    wd = tmp_path / "w"
    ens = SisaEnsemble.from_config(CFG, wd).fit(X, y, ids=ids)
    np.save(tmp_path / "X.npy", X)
    stop = tmp_path / "stop"
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(wd), str(tmp_path / "X.npy"), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert server.stdout.readline().strip() == "serving"

        def slow(plan, entry, metrics):
            time.sleep(0.5)  # a long retraining: the server predicts many times meanwhile

        receipt = ens.delete(every_shard(ens, ids), progress=slow)
        stop.touch()
        out, err = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["errors"] == {}, (summary, err[-2000:])
    assert summary["ok"] >= 2 and summary["longest"] >= 1.0, "the server waited through the retraining"
    assert np.array_equal(np.array(summary["last"]), ens.predict(X)), "and then served the new models"
    assert receipt.request_id


SERVER = """
import json, sys, time, os
import numpy as np
from sisa import SisaEnsemble
ens = SisaEnsemble.open(sys.argv[1], executor="inprocess")
X = np.load(sys.argv[2])
ok, errors, longest, last = 0, {}, 0.0, ens.predict(X).tolist()  # warm: models loaded before the deletion
print("serving", flush=True)
while True:
    done = os.path.exists(sys.argv[3])
    t = time.monotonic()
    try:
        last = ens.predict(X).tolist()
        ok += 1
    except Exception as e:
        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
    longest = max(longest, time.monotonic() - t)
    if done:
        break
    time.sleep(0.01)
print(json.dumps({"ok": ok, "errors": errors, "longest": longest, "last": last}))
"""


def test_a_deletion_whose_process_died_is_reported_at_once(tmp_path):
    X, y, ids = tiny_data(n=160)
    wd = tmp_path / "w"
    ens = SisaEnsemble.from_config(CFG, wd).fit(X, y, ids=ids)
    gone = every_shard(ens, ids)
    code = "import json, sys; from sisa import SisaEnsemble; SisaEnsemble.open(sys.argv[1]).delete(json.loads(sys.argv[2]))"
    res = subprocess.run(
        [sys.executable, "-c", code, str(wd), json.dumps(gone)],
        env={**os.environ, "SISA_CRASH_AT": "during_retrain"},
        capture_output=True,
        cwd=ROOT,
    )
    assert res.returncode == -signal.SIGKILL
    stalled = SisaEnsemble.open(wd, executor="inprocess", recover=False, wait_timeout=60)
    t = time.monotonic()
    with pytest.raises(RetrainingError, match="no process is running it any more") as e:
        stalled.predict(X)
    assert time.monotonic() - t < 10 and not e.value.running and e.value.request_id
    assert "refit" not in str(e.value)
    assert SisaEnsemble.open(wd, executor="inprocess").predict(X).shape == (160,)
