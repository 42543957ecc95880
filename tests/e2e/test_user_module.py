"""A user's own LightningModule: self.log reaches MLflow, a whole-run LR horizon stays exact, and the
contract (importable LightningModule, training_step, configure_optimizers, logits of (n, num_classes))
is checked at fit before anything is written."""

import numpy as np
import pytest
import torch
from helpers import tiny_config, tiny_data, weights_equal
from mlflow.tracking import MlflowClient

from shards.training import load_checkpoint
from sisa import SisaEnsemble
from sisa.errors import ConfigError


def _user(name, **over):
    return tiny_config(model={"name": f"usermodel:{name}", "kwargs": {}}, **over)


def test_self_log_values_reach_the_shard_runs(tmp_path, ray_session):
    X, y, ids = tiny_data(n=150)
    cfg = _user("LoggingNet", tracking={"enabled": True}, cluster={"executor": "ray"})
    seen = []
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w")
    ens.fit(X, y, ids=ids, progress=lambda plan, entry, metrics: seen.append(metrics))
    ens.close()
    epochs = ens.config.epochs_per_stage()
    assert len(seen) == ens.config.sharding.shards * ens.config.sharding.slices, "one report per shard and stage"
    for m in seen:
        assert len(m["epochs"]) == epochs[m["stage"] - 1]
        for e in m["epochs"]:
            assert 0 < e["logged"]["train_loss"] < 10
            assert e["logged"]["rows_seen"] == e["samples"] == m["rows"], "an epoch-level sum over its batches"

    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    exp = next(e for e in client.search_experiments() if e.name.startswith("sisa-tiny"))
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3
    for child in children:
        history = client.get_metric_history(child.info.run_id, "user/train_loss")
        assert [m.step for m in history] == list(range(sum(epochs)))
        shard = int(child.data.tags["sisa.shard"])
        want = [
            e["logged"]["train_loss"]
            for m in sorted(seen, key=lambda m: m["stage"])
            if m["shard"] == shard
            for e in m["epochs"]
        ]
        assert np.allclose([m.value for m in history], want)


def test_one_cycle_over_the_whole_run_trains_every_stage_and_stays_exact(tmp_path):
    X, y, ids = tiny_data(n=180)
    cfg = _user("OneCycleNet", sharding={"shards": 2, "slices": 3}, training={"epochs": 6, "lr": 0.1})
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w").fit(X, y, ids=ids)
    total = sum(ens.config.epochs_per_stage())
    store = ens.storage()
    for sh in ens.manifest["shards"]:
        last = sh["checkpoints"][-1]
        sched = load_checkpoint(store.read(last["file"], last["sha256"]))["schedulers"][0]
        assert sched["total_steps"] == total and sched["last_epoch"] == total, "one cycle across all stages"
    gone = [ids[3], ids[50], ids[111]]
    receipt = ens.delete(gone)
    assert receipt.shards
    keep = ~np.isin(ids, gone)
    ref = SisaEnsemble.from_config(tmp_path / "w" / "config.yaml", tmp_path / "ref").fit(
        X[keep], y[keep], ids=ids[keep]
    )
    assert weights_equal(ens, ref)


def test_a_one_stage_horizon_is_a_clear_config_error(tmp_path):
    X, y, ids = tiny_data(n=120)
    with pytest.raises(ConfigError, match=r"horizon must cover all stages.*sisa_context.total_epochs") as info:
        SisaEnsemble.from_config(_user("PerStageOneCycleNet"), tmp_path / "w").fit(X, y, ids=ids)
    assert info.value.stage == 2


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("Missing", {}, r"cannot be imported .* importable here and on every Ray worker"),
        ("NotAModule", {}, r"not a pytorch_lightning.LightningModule"),
        ("NoOptimizerNet", {}, r"does not define configure_optimizers\(\)"),
        ("WrongOutputNet", {}, r"returned \(2, 2\); it must return logits of shape \(batch, num_classes\) = \(2, 3\)"),
        ("TinyNet", {"depth": 3}, r"cannot be built with model.kwargs \['depth'\]"),
    ],
)
def test_the_module_contract_is_checked_at_fit_before_anything_is_written(tmp_path, name, kwargs, match):
    X, y, ids = tiny_data(n=120)
    cfg = tiny_config(model={"name": f"usermodel:{name}", "kwargs": kwargs})
    before = torch.random.get_rng_state()
    with pytest.raises(ConfigError, match=match):
        SisaEnsemble.from_config(cfg, tmp_path / "w").fit(X, y, ids=ids)
    assert not (tmp_path / "w" / "config.yaml").exists() and not (tmp_path / "w" / "store").exists()
    assert torch.equal(before, torch.random.get_rng_state()), "the check leaves the caller's RNG alone"


def test_builtin_model_with_an_unknown_kwarg_is_a_config_error(tmp_path):
    X, y, ids = tiny_data(n=120)
    with pytest.raises(ConfigError, match=r"model 'mlp' cannot be built with model.kwargs \['width'\]"):
        SisaEnsemble.from_config(tiny_config(model={"name": "mlp", "kwargs": {"width": 3}}), tmp_path / "w").fit(
            X, y, ids=ids
        )


def test_cnn_on_tabular_rows_fails_at_the_forward_check(tmp_path):
    X, y, ids = tiny_data(n=120)
    with pytest.raises(ConfigError, match=r"forward on a batch of zeros of shape \(2, 6\)"):
        SisaEnsemble.from_config(tiny_config(model={"name": "cnn", "kwargs": {}}), tmp_path / "w").fit(X, y, ids=ids)
