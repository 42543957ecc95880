"""MLflow tracking: one experiment per ensemble, a parent run per operation, a child run per shard.

Workers never talk to MLflow: they return their metrics and the driver logs them in a few batched calls
when the operation ends, so one sqlite file never has several writers and logging stays cheap. No raw
rows or raw ids are ever logged; deletions are described by counts and keyed hashes only.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from sisa.config import dump_yaml


def default_uri(workdir) -> str:
    return f"sqlite:///{workdir.path / 'mlflow.db'}"


class Tracker:
    def __init__(self, config, workdir, uri: str | None = None):
        self.config, self.workdir = config, workdir
        self.enabled = config.tracking.enabled
        self.uri = uri or config.tracking.uri or default_uri(workdir)
        self.experiment = config.tracking.experiment or f"sisa-{config.name}-{workdir.path.name}"
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        location = (self.workdir.path / "mlartifacts").as_uri() if self.uri.startswith("sqlite:") else None
        return self.client.create_experiment(self.experiment, artifact_location=location)

    @contextmanager
    def operation(self, kind: str, manifest: dict, tags: dict | None = None):
        if not self.enabled:
            yield _NullRun()
            return
        from mlflow.entities import Param

        c = self.config
        exp = self.experiment_id()
        run = self.client.create_run(
            exp,
            run_name=f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"sisa.operation": kind, "sisa.config_hash": manifest["config_hash"], **(tags or {})},
        )
        params = {
            "shards": c.sharding.shards,
            "slices": c.sharding.slices,
            "schedule": list(c.epochs_per_stage()),
            "model": c.model.name,
            "model_kwargs": c.model.kwargs,
            "epochs": c.training.epochs,
            "batch_size": c.training.batch_size,
            "optimizer": c.training.optimizer,
            "lr": c.training.lr,
            "aggregation": c.aggregation.method,
            "seed": c.seed,
            "config_hash": manifest["config_hash"],
            "executor": c.cluster.executor,
        }
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        self.client.log_text(run.info.run_id, dump_yaml(c), "config.yaml")
        op = _OpRun(self, exp, run.info.run_id, kind, manifest)
        try:
            yield op
        except BaseException:
            self.client.set_terminated(run.info.run_id, "FAILED")
            raise
        self.client.set_terminated(run.info.run_id, "FINISHED")


class _NullRun:
    run_id = None

    def stage(self, shard, metrics):
        pass

    def finish(self, *args, **kwargs):
        pass


class _OpRun:
    def __init__(self, tracker: Tracker, exp: str, run_id: str, kind: str, manifest: dict):
        self.tracker, self.exp, self.run_id, self.kind = tracker, exp, run_id, kind
        self.manifest = manifest
        self.stages: dict[int, list[dict]] = {}
        self.t0 = time.time()

    def stage(self, shard: int, metrics: dict) -> None:
        self.stages.setdefault(shard, []).append(metrics)

    def finish(self, ens, plans, metrics: dict, extra_tags: dict | None = None) -> None:
        from mlflow.entities import Metric, Param

        client = self.tracker.client
        now = int(time.time() * 1000)
        for plan in plans:
            child = client.create_run(
                self.exp,
                run_name=f"{self.kind}-shard-{plan.shard:03d}",
                tags={
                    "mlflow.parentRunId": self.run_id,
                    "sisa.operation": self.kind,
                    "sisa.shard": str(plan.shard),
                    "sisa.start_stage": str(plan.start_stage),
                    "sisa.config_hash": self.manifest["config_hash"],
                },
            )
            ms: list = []
            epoch = 0
            for st in self.stages.get(plan.shard, []):
                ms += [
                    Metric("stage_rows", st["rows"], now, st["stage"]),
                    Metric("stage_seconds", st["seconds"], now, st["stage"]),
                ]
                if "train_accuracy" in st:
                    ms.append(Metric("stage_train_accuracy", st["train_accuracy"], now, st["stage"]))
                for e in st["epochs"]:
                    ms += [
                        Metric("loss", e["loss"], now, epoch),
                        Metric("epoch_seconds", e["seconds"], now, epoch),
                        Metric("epoch_samples", e["samples"], now, epoch),
                    ]
                    epoch += 1
            acc = metrics.get("shard_accuracy", {}).get(str(plan.shard))
            if acc is not None:
                ms.append(Metric("test_accuracy", acc, now, 0))
            params = [Param("shard", str(plan.shard)), Param("start_stage", str(plan.start_stage))]
            for i in range(0, len(ms), 900):
                client.log_batch(child.info.run_id, metrics=ms[i : i + 900], params=params if i == 0 else [])
            if not ms:
                client.log_batch(child.info.run_id, params=params)
            client.set_terminated(child.info.run_id, "FINISHED")
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        flat["wall_seconds"] = time.time() - self.t0
        flat["shards_trained"] = len(plans)
        client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in flat.items()])
        if extra_tags:
            for k, v in extra_tags.items():
                client.set_tag(self.run_id, k, str(v))
