"""MLflow: one experiment per ensemble, a parent run per operation with one child run per shard."""

from helpers import tiny_config, tiny_data
from mlflow.tracking import MlflowClient

from sisa import SisaEnsemble


def test_fit_and_delete_runs_with_shard_children(tmp_path):
    X, y, ids = tiny_data(n=180)
    ens = SisaEnsemble.from_config(tiny_config(tracking={"enabled": True, "deletion_plots": True}), tmp_path / "w")
    ens.fit(X, y, ids=ids, eval_set=(X[:30], y[:30]))
    receipt = ens.delete(["u-3", "u-4"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    exps = [e for e in client.search_experiments() if e.name.startswith("sisa-tiny")]
    assert len(exps) == 1
    runs = client.search_runs([exps[0].experiment_id], max_results=100)
    parents = {r.data.tags["sisa.operation"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {"fit", "delete"}
    fit_run = parents["fit"]
    assert fit_run.data.params["shards"] == "3" and fit_run.data.params["slices"] == "3"
    assert fit_run.data.params["config_hash"] == ens.manifest["config_hash"]
    assert "ensemble_accuracy" in fit_run.data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == fit_run.info.run_id]
    assert sorted(r.data.tags["sisa.shard"] for r in children) == ["0", "1", "2"]
    child = children[0]
    assert {"loss", "stage_rows", "stage_seconds", "test_accuracy"} <= set(child.data.metrics)
    assert len(client.get_metric_history(child.info.run_id, "loss")) == sum(ens.config.epochs_per_stage())
    accs = client.get_metric_history(child.info.run_id, "epoch_train_accuracy")
    assert len(accs) == sum(ens.config.epochs_per_stage()) and all(0 <= m.value <= 1 for m in accs)
    assert "config.yaml" in [a.path for a in client.list_artifacts(fit_run.info.run_id)]
    dele = parents["delete"]
    assert dele.data.tags["sisa.request_id"] == receipt.request_id
    assert dele.data.metrics["rows_deleted"] == 2 and dele.data.metrics["sample_epochs"] > 0
    del_children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == dele.info.run_id]
    assert sorted(int(r.data.tags["sisa.shard"]) for r in del_children) == sorted(receipt.shards)

    # names, ensemble metrics and per-stage / per-epoch metrics the UI charts
    assert fit_run.info.run_name == "fit" and dele.info.run_name == f"delete {receipt.request_id[-8:]}"
    assert {"wall_seconds", "sample_epochs", "shards_trained", "rows"} <= set(fit_run.data.metrics)
    want = {"ensemble_accuracy", "ensemble_accuracy_before", "shards_retrained", "sample_epochs"}
    assert want | {"full_retrain_sample_epochs", "speedup", "wall_seconds"} <= set(dele.data.metrics)
    assert dele.data.metrics["sample_epochs"] == receipt.cost["sample_epochs"]
    assert dele.data.metrics["sample_epochs"] < dele.data.metrics["full_retrain_sample_epochs"]
    assert "Deleted 2 row(s)" in dele.data.tags["mlflow.note.content"]
    epochs = ens.config.epochs_per_stage()
    for r in del_children:
        start = int(r.data.tags["sisa.start_stage"])
        stages = [m.step for m in client.get_metric_history(r.info.run_id, "stage_seconds")]
        assert stages == list(range(start, len(epochs) + 1))
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert steps == list(range(sum(epochs[: start - 1]), sum(epochs)))  # aligned with the fit's epochs
        samples = sum(m.value for m in client.get_metric_history(r.info.run_id, "epoch_samples"))
        assert r.data.metrics["sample_epochs"] == samples
        assert {"stage_train_accuracy", "stage_loss", "stage_rows", "test_accuracy"} <= set(r.data.metrics)
    assert sum(r.data.metrics["sample_epochs"] for r in del_children) == receipt.cost["sample_epochs"]

    # plots: PNGs on the parents, the heat map of retrained stages on the deletion
    def plots(run):
        return {a.path: a for a in client.list_artifacts(run.info.run_id, "plots")}

    assert set(plots(fit_run)) == {"plots/shard_accuracy.png", "plots/shard_sizes.png"}
    assert set(plots(dele)) == {"plots/shard_accuracy.png", "plots/shard_sizes.png", "plots/retrained_stages.png"}
    png = client.download_artifacts(dele.info.run_id, "plots/retrained_stages.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_tracking_can_be_disabled(tmp_path):
    X, y, ids = tiny_data(n=90)
    SisaEnsemble.from_config(tiny_config(), tmp_path / "w").fit(X, y, ids=ids)
    assert not (tmp_path / "w" / "mlflow.db").exists()
