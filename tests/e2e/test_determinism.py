"""Bit-exact determinism: straight vs resumed from every stage in a fresh process; Ray vs in-process."""

import dataclasses
import json
import subprocess
import sys

import torch
from helpers import tiny_config, tiny_data, weights_equal

from shards.training import EpochBatches, load_checkpoint
from sisa import SisaEnsemble


def _state(storage, entry):
    return load_checkpoint(storage.read(entry["file"], entry["sha256"]))


def test_resume_from_every_stage_in_fresh_process_is_bit_identical(tmp_path):
    cfg = tiny_config(
        sharding={"shards": 2, "slices": 4},
        model={"name": "mlp", "kwargs": {"hidden": [16], "dropout": 0.2}},
        training={"epochs": 5, "lr_gamma": 0.8, "optimizer": "adam"},
    )
    X, y, ids = tiny_data(n=200)
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w").fit(X, y, ids=ids)
    storage, spec = ens.storage(), ens._ctx.spec(ens.manifest)
    shard = 1
    sh = ens.manifest["shards"][shard]
    straight = sh["checkpoints"][-1]
    for start in range(1, 5):  # resume after stage start-1 (start=1: from fresh init)
        args = {
            "spec": dataclasses.asdict(spec),
            "root": storage.root,
            "shard": shard,
            "start": start,
            "slices": sh["slices"],
            "prev": sh["checkpoints"][start - 2] if start > 1 else None,
        }
        (tmp_path / "args.json").write_text(json.dumps(args))
        out = subprocess.run(
            [sys.executable, "tests/resume_worker.py", str(tmp_path / "args.json")],
            capture_output=True,
            text=True,
            check=True,
        )
        resumed = json.loads(out.stdout.strip().splitlines()[-1])
        a, b = _state(storage, straight), _state(storage, resumed)
        for part in ("state_dict",):
            assert a[part].keys() == b[part].keys()
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (
                f"weights differ resuming at stage {start}"
            )
        opt_a, opt_b = a["optimizers"][0]["state"], b["optimizers"][0]["state"]
        assert all(torch.equal(opt_a[p][k], opt_b[p][k]) for p in opt_a for k in opt_a[p]), "optimizer state differs"
        assert a["schedulers"] == b["schedulers"]
        assert resumed["sha256"] == straight["sha256"], "checkpoint bytes differ"


def test_checkpoint_holds_optimizer_and_scheduler_state(tmp_path):
    X, y, ids = tiny_data(n=120)
    ens = SisaEnsemble.from_config(tiny_config(), tmp_path / "w").fit(X, y, ids=ids)
    ck = _state(ens.storage(), ens.manifest["shards"][0]["checkpoints"][1])
    assert ck["optimizers"] and ck["optimizers"][0]["state"], "Adam moments are saved"
    assert ck["schedulers"] and ck["schedulers"][0]["last_epoch"] > 0
    assert ck["stage"] == 2 and ck["lineage"]


def test_epochs_see_different_orders_that_depend_only_on_the_key():
    a = EpochBatches(50, 8, seed=1, shard=0, stage=1)
    first = [t.tolist() for t in a]
    a.set_epoch(1)
    second = [t.tolist() for t in a]
    assert first != second
    b = EpochBatches(50, 8, seed=1, shard=0, stage=1)
    b.set_epoch(1)
    assert [t.tolist() for t in b] == second


def test_ray_and_inprocess_give_identical_weights(tmp_path, ray_session):
    X, y, ids = tiny_data(n=240)
    cfg = tiny_config()
    a = SisaEnsemble.from_config(cfg, tmp_path / "ray", executor="ray").fit(X, y, ids=ids)
    b = SisaEnsemble.from_config(cfg, tmp_path / "local", executor="inprocess").fit(X, y, ids=ids)
    assert weights_equal(a, b)
    assert (a.predict_proba(X) == b.predict_proba(X)).all()
    a.close()


def test_seed_changes_weights(tmp_path):
    X, y, ids = tiny_data(n=120)
    a = SisaEnsemble.from_config(tiny_config(seed=1), tmp_path / "a").fit(X, y, ids=ids)
    b = SisaEnsemble.from_config(tiny_config(seed=2), tmp_path / "b").fit(X, y, ids=ids)
    assert not weights_equal(a, b)
