"""The `sisa` command end to end: train, status, predict, delete (args and --ids-file), errors."""

import json
import subprocess
import sys

import numpy as np
import yaml
from helpers import tiny_config


def sisa(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "sisa.cli", *map(str, args)], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(out.stdout + out.stderr)
    return out


def test_cli_train_status_predict_delete(tmp_path):
    cfg = tiny_config(data={"source": "digits", "test_fraction": 0.2}, training={"epochs": 2})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    wd = tmp_path / "w"
    out = sisa("train", tmp_path / "c.yaml", "--workdir", wd).stdout
    assert "test acc" in out and "ensemble: 3 shards x 3 slices" in out
    st = json.loads(sisa("status", "--workdir", wd, "--json").stdout)
    assert st["rows"] > 1000 and len(st["shards"]) == 3
    from sklearn.datasets import load_digits

    X = (load_digits().data[:5] / 16).astype(np.float32)
    np.savez(tmp_path / "x.npz", X=X)
    pred = sisa("predict", "--workdir", wd, "--input", tmp_path / "x.npz").stdout.split()
    assert len(pred) == 5 and all(p.isdigit() for p in pred)
    from sisa import SisaEnsemble

    ens = SisaEnsemble.open(wd, executor="inprocess")
    train_ids = [
        i for i in ("digits-0", "digits-1", "digits-2", "digits-4", "digits-6", "digits-9") if _is_train(ens, i)
    ][:3]
    dry = json.loads(sisa("delete", "--workdir", wd, "--dry-run", "--json", train_ids[0]).stdout)
    assert dry["rows"] == 1
    out = sisa("delete", "--workdir", wd, "--executor", "inprocess", train_ids[0]).stdout
    assert "1 row(s) deleted" in out and "sample-epochs" in out
    (tmp_path / "ids.txt").write_text("\n".join(train_ids[1:]) + "\n")
    out = sisa("delete", "--workdir", wd, "--executor", "inprocess", "--ids-file", tmp_path / "ids.txt").stdout
    assert f"{len(train_ids) - 1} row(s) deleted" in out
    bad = sisa("delete", "--workdir", wd, "--executor", "inprocess", "nobody", check=False)
    assert bad.returncode == 2 and "'nobody'" in bad.stderr
    again = sisa("delete", "--workdir", wd, "--executor", "inprocess", train_ids[0]).stdout
    assert "already deleted" in again


def _is_train(ens, i):
    from shards.store import read_slice

    s, j = ens.shard_of(i)
    return i in read_slice(ens.storage(), ens.manifest["shards"][s]["slices"][j])["id"].tolist()


def test_cli_errors_are_clear(tmp_path):
    res = sisa("status", "--workdir", tmp_path, check=False)
    assert res.returncode == 2 and "no trained ensemble" in res.stderr


def test_cli_delete_wait_effective_leaves_owed_work_that_the_next_open_finishes(tmp_path):
    from helpers import tiny_data

    from sisa import SisaEnsemble
    from sisa.ledger import Ledger

    X, y, ids = tiny_data(n=120)
    wd = tmp_path / "w"
    SisaEnsemble.from_config(tiny_config(), wd).fit(X, y, ids=ids)
    bad = sisa("delete", "--workdir", wd, "--wait", "soon", "u-3", check=False)
    assert bad.returncode == 2 and "'soon' is not one of 'effective', 'done'" in bad.stderr
    led = Ledger(wd / "ledger.db")
    assert led.requests() == [], "a refused --wait records nothing"
    out = json.loads(
        sisa("delete", "--workdir", wd, "--executor", "inprocess", "--wait", "effective", "--json", "u-3").stdout
    )
    assert out["rows_deleted"] == 1 and out["timing"]["state"] == "effective" and "seconds_to_done" not in out["timing"]
    assert [q["state"] for q in led.requests()] == ["effective"]
    assert (wd / "owed" / f"{out['request_id']}.json").exists()
    sisa("status", "--workdir", wd)  # opening the workdir settles what is owed
    assert [q["state"] for q in led.requests()] == ["done"] and list((wd / "owed").iterdir()) == []
    text = sisa("delete", "--workdir", wd, "--executor", "inprocess", "u-4").stdout
    assert "done after" in text and [q["state"] for q in led.requests()] == ["done", "done"]
    text = sisa("delete", "--workdir", wd, "--executor", "inprocess", "--wait", "effective", "u-5").stdout
    assert "effective after" in text and "owed" in text
