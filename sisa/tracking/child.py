"""A shard's child run under an operation's MLflow run: its stages' and epochs' figures, its test accuracy."""

from __future__ import annotations

import time

from sisa.tracking import adapter


def log_child(run, manifest, plan, metrics: dict, epochs: list[int]) -> int:
    """One shard's child run: per-stage and per-epoch figures; returns its sample-epochs."""
    from mlflow.entities import Metric, Param

    client = run.tracker.client
    epochs = list(manifest.shards[plan.shard].schedule(tuple(epochs)))  # appended stages make it longer
    stages = sorted(run.stages.get(plan.shard, []), key=lambda st: st["stage"])
    start = int((stages[0]["_end"] - stages[0]["seconds"]) * 1000) if stages else None
    child = client.create_run(
        run.exp,
        run_name=f"shard-{plan.shard:03d}",
        start_time=start,
        tags={
            "mlflow.parentRunId": run.run_id,
            "sisa.operation": run.kind,
            "sisa.shard": str(plan.shard),
            "sisa.start_stage": str(plan.start_stage),
            "sisa.config_hash": manifest.config_hash,
            "mlflow.note.content": f"Shard {plan.shard}: stages {plan.start_stage}..{len(epochs)} "
            + _how(run.kind, plan),
        },
    )
    ms, sample_epochs = _stage_metrics(stages, epochs)
    now = int(time.time() * 1000)
    acc = by_shard(metrics.get("shard_accuracy")).get(plan.shard)
    if acc is not None:
        ms.append(Metric("test_accuracy", acc, now, 0))
    ms.append(Metric("sample_epochs", sample_epochs, now, 0))
    params = [
        Param("shard", str(plan.shard)),
        Param("start_stage", str(plan.start_stage)),
        Param("slice_rows", str([e.rows for e in manifest.shards[plan.shard].slices])),
    ]
    for i in range(0, len(ms), 900):
        client.log_batch(child.info.run_id, metrics=ms[i : i + 900], params=params if i == 0 else [])
    end = int(stages[-1]["_end"] * 1000) if stages else None
    with no_url_print():  # a server client prints "View run ..." per run; once per operation is enough
        client.set_terminated(child.info.run_id, "FINISHED", end_time=end)
    return sample_epochs


def _stage_metrics(stages: list[dict], epochs: list[int]) -> tuple[list, int]:
    """The metrics of a shard's stages (step = stage) and epochs (step = epoch across the whole schedule)."""
    from mlflow.entities import Metric

    ms: list = []
    sample_epochs = 0
    for st in stages:
        ts, r = int(st["_end"] * 1000), st["stage"]
        samples = sum(e["samples"] for e in st["epochs"])
        sample_epochs += samples
        ms += [
            Metric("stage_rows", st["rows"], ts, r),
            Metric("stage_seconds", st["seconds"], ts, r),
            Metric("stage_samples", samples, ts, r),
        ]
        if "train_accuracy" in st:
            ms.append(Metric("stage_train_accuracy", st["train_accuracy"], ts, r))
        if "engine_setup_seconds" in st:  # the training engine's fixed cost (shards.training)
            ms.append(Metric("stage_engine_setup_seconds", st["engine_setup_seconds"], ts, r))
        if st["epochs"]:
            ms.append(Metric("stage_loss", st["epochs"][-1]["loss"], ts, r))
        epoch = sum(epochs[: r - 1])  # epochs are numbered across the shard's whole schedule
        for e in st["epochs"]:
            ms += [
                Metric("loss", e["loss"], ts, epoch),
                Metric("epoch_seconds", e["seconds"], ts, epoch),
                Metric("epoch_samples", e["samples"], ts, epoch),
            ]
            if "accuracy" in e:
                ms.append(Metric("epoch_train_accuracy", e["accuracy"], ts, epoch))
            for name, value in e.get("logged", {}).items():  # a user module's self.log values
                ms.append(Metric(f"user/{name}", value, ts, epoch))
            epoch += 1
    return ms, sample_epochs


def no_url_print():
    """No "View run ..." line per run from a server client: once per operation is enough."""
    return adapter.env("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _how(kind: str, plan) -> str:
    if plan.start_stage > 1:
        return f"retrained from the checkpoint after stage {plan.start_stage - 1}"
    return "trained" if kind == "fit" else "retrained from a fresh initialisation"


def by_shard(d) -> dict[int, float]:
    return {int(k): v for k, v in (d or {}).items() if v is not None}
