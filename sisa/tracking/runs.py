"""MLflow tracking: one experiment per ensemble, a parent run per operation, a child run per shard.

Operations (`fit`, each `delete` request, and `repair` / `audit` from their modules) use
``Tracker.operation(kind, manifest, tags)``; the yielded run collects per-stage metrics through
``stage(shard, metrics)`` and logs everything in ``finish(ens, plans, metrics, ...)``: child runs per
shard (per-stage and per-epoch loss, accuracy, duration, samples), the parent's ensemble metrics, params,
the config YAML and PNG plots. ``log_ensemble`` logs the ensemble version as a registered pyfunc model
(`sisa.tracking.pyfunc`), and after a deletion purges every model version that saw the deleted rows.

Workers never talk to MLflow: they return their metrics and the driver logs them in a few batched calls
when the operation ends, so one sqlite file never has several writers and logging stays cheap (on a
cluster, point ``tracking.uri`` at an MLflow server). No raw rows or raw ids are ever logged; deletions
are described by counts and keyed hashes only. mlflow is imported only when tracking is enabled.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from sisa.config import dump_yaml


def default_uri(workdir) -> str:
    return f"sqlite:///{workdir.path / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for servers and other databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


class Tracker:
    def __init__(self, config, workdir, uri: str | None = None):
        self.config, self.workdir = config, workdir
        self.enabled = config.tracking.enabled
        self.uri = uri or config.tracking.uri or default_uri(workdir)
        self.experiment = config.tracking.experiment or f"sisa-{config.name}-{workdir.path.name}"
        self.model_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.experiment)
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        local = sqlite_path(self.uri) is not None
        location = (self.workdir.path / "mlartifacts").as_uri() if local else None
        return self.client.create_experiment(
            self.experiment,
            artifact_location=location,
            tags={
                "mlflow.note.content": f"SISA ensemble `{self.config.name}` in {self.workdir.path}: "
                "one parent run per operation (fit, delete, repair, audit), one child run per shard. "
                f"Registered model `{self.model_name}`, alias `current`.",
                "sisa.ensemble": self.model_name,
                "mlflow.experimentKind": "custom_model_development",  # a "Machine learning" experiment in the UI
            },
        )

    @contextmanager
    def operation(self, kind: str, manifest: dict, tags: dict | None = None):
        if not self.enabled:
            yield _NullRun()
            return
        from mlflow.entities import Param

        c = self.config
        exp = self.experiment_id()
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if "sisa.request_id" in tags:  # a re-run after a crash: the dead attempt's run is closed first
            self.settle(tags["sisa.request_id"])
        title = kind
        if "sisa.request_id" in tags:  # "delete 794324d0": the request id's random part (full id in the tag)
            title += f" {tags['sisa.request_id'].rsplit('-', 1)[-1]}"
        run = self.client.create_run(
            exp,
            run_name=title,
            tags={
                "sisa.operation": kind,
                "sisa.config_hash": manifest["config_hash"],
                "sisa.ensemble": self.model_name,
                "sisa.shards": str(c.sharding.shards),
                "sisa.slices": str(c.sharding.slices),
                **tags,
            },
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
        self.client.log_text(run.info.run_id, dump_yaml(c, redact=True), "config.yaml")
        op = _OpRun(self, exp, run.info.run_id, kind, manifest)
        try:
            yield op
        except BaseException:
            self.client.set_terminated(run.info.run_id, "FAILED")
            raise
        self.client.set_terminated(run.info.run_id, "FINISHED")

    def publish(
        self, ens, run_id: str | None = None, purge: bool = False, request_id: str | None = None, force: bool = False
    ):
        """Log the ensemble's current version as a registered pyfunc model (alias ``current``); with
        ``purge``, delete every other version of it and its artifacts. Idempotent (``force``: log a new
        version even if ``current`` is already this ensemble). None when disabled.
        ``request_id`` without ``run_id``: a request finished on reopen; its dead attempt's run is closed."""
        if not self.enabled:
            return None
        from sisa.tracking.registry import publish

        if request_id is not None and run_id is None:
            self.settle(request_id)
        return publish(self, ens, run_id, purge, force)

    def settle(self, request_id: str) -> None:
        """Mark the runs of a request's attempt that died (still RUNNING) as KILLED, noting that."""
        flt = f"tags.`sisa.request_id` = '{request_id}' and attributes.status = 'RUNNING'"
        for r in self.client.search_runs([self.experiment_id()], filter_string=flt):
            self.client.set_tag(
                r.info.run_id,
                "mlflow.note.content",
                "The process died here; the request was finished when the workdir was reopened.",
            )
            with _no_url_print():
                self.client.set_terminated(r.info.run_id, "KILLED")


class _NullRun:
    run_id = None

    def stage(self, shard, metrics):
        pass

    def finish(self, *args, **kwargs):
        pass

    def log_ensemble(self, *args, **kwargs):
        return None


class _OpRun:
    def __init__(self, tracker: Tracker, exp: str, run_id: str, kind: str, manifest: dict):
        self.tracker, self.exp, self.run_id, self.kind = tracker, exp, run_id, kind
        self.manifest = manifest
        self.stages: dict[int, list[dict]] = {}
        self.t0 = time.time()

    def stage(self, shard: int, metrics: dict) -> None:
        """Called on the driver as each stage result arrives (workers never log)."""
        self.stages.setdefault(shard, []).append({**metrics, "_end": time.time()})

    def log_ensemble(self, ens, purge: bool = False):
        """The ensemble version this operation produced, as a registered pyfunc model."""
        return self.tracker.publish(ens, self.run_id, purge)

    def finish(
        self, ens, plans, metrics: dict, extra_tags: dict | None = None, slices_hit=None, note: str | None = None
    ) -> None:
        """Log the shard child runs, the parent's ensemble metrics, tags and plots.

        ``metrics`` may hold ``shard_accuracy`` / ``shard_accuracy_before`` ({shard: acc}) for the plots;
        ``slices_hit`` the (shard, slice) pairs (0-based) that held deleted rows, for the heat map.
        """
        from mlflow.entities import Metric

        client = self.tracker.client
        now = int(time.time() * 1000)
        epochs = list(ens.config.epochs_per_stage())
        sample_epochs = 0
        for plan in plans:
            sample_epochs += self._log_child(client, plan, metrics, epochs)
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        flat["wall_seconds"] = time.time() - self.t0
        flat["shards_trained"] = len(plans)
        flat.setdefault("sample_epochs", sample_epochs)  # a deletion passes its cost figures
        flat["rows"] = sum(e["rows"] for sh in self.manifest["shards"] for e in sh["slices"])
        ms = [Metric(k, float(v), now, 0) for k, v in flat.items()]
        for s, acc in sorted(_by_shard(metrics.get("shard_accuracy")).items()):
            ms.append(Metric("shard_test_accuracy", float(acc), now, s))
        client.log_batch(self.run_id, metrics=ms)
        tags = {k: str(v) for k, v in (extra_tags or {}).items()}
        tags["mlflow.note.content"] = note or self._note(plans, flat)
        for k, v in tags.items():
            client.set_tag(self.run_id, k, v)
        self._log_plots(client, plans, metrics, slices_hit)

    # -- helpers -------------------------------------------------------------------------------
    def _log_child(self, client, plan, metrics: dict, epochs: list[int]) -> int:
        from mlflow.entities import Metric, Param

        stages = sorted(self.stages.get(plan.shard, []), key=lambda st: st["stage"])
        start = int((stages[0]["_end"] - stages[0]["seconds"]) * 1000) if stages else None
        sh = self.manifest["shards"][plan.shard]
        child = client.create_run(
            self.exp,
            run_name=f"shard-{plan.shard:03d}",
            start_time=start,
            tags={
                "mlflow.parentRunId": self.run_id,
                "sisa.operation": self.kind,
                "sisa.shard": str(plan.shard),
                "sisa.start_stage": str(plan.start_stage),
                "sisa.config_hash": self.manifest["config_hash"],
                "mlflow.note.content": f"Shard {plan.shard}: stages {plan.start_stage}..{len(epochs)} "
                + _how(self.kind, plan),
            },
        )
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
        acc = _by_shard(metrics.get("shard_accuracy")).get(plan.shard)
        if acc is not None:
            ms.append(Metric("test_accuracy", acc, int(time.time() * 1000), 0))
        ms.append(Metric("sample_epochs", sample_epochs, int(time.time() * 1000), 0))
        params = [
            Param("shard", str(plan.shard)),
            Param("start_stage", str(plan.start_stage)),
            Param("slice_rows", str([e["rows"] for e in sh["slices"]])),
        ]
        for i in range(0, len(ms), 900):
            client.log_batch(child.info.run_id, metrics=ms[i : i + 900], params=params if i == 0 else [])
        end = int(stages[-1]["_end"] * 1000) if stages else None
        with _no_url_print():  # a server client prints "View run ..." per run; once per operation is enough
            client.set_terminated(child.info.run_id, "FINISHED", end_time=end)
        return sample_epochs

    def _note(self, plans, flat: dict) -> str:
        acc = flat.get("ensemble_accuracy")
        acc_s = f"test accuracy {acc:.4f}" if acc is not None else "no evaluation set"
        if self.kind == "fit":
            return f"Trained {len(plans)} shards × {len(self.manifest['shards'][0]['slices'])} slices; {acc_s}."
        if self.kind == "delete":
            before = flat.get("ensemble_accuracy_before")
            speed = flat.get("speedup")
            return (
                f"Deleted {int(flat.get('rows_deleted', 0))} row(s); retrained {len(plans)} shard(s) "
                + (f"at {speed:.1f}× less work than a full retrain; " if speed else "; ")
                + (f"test accuracy {before:.4f} → {acc:.4f}." if before is not None and acc is not None else acc_s)
            )
        tail = f"; test accuracy {acc:.4f}." if acc is not None else "."
        return f"{self.kind}: {len(plans)} shard(s) retrained{tail}" if plans else f"{self.kind}{tail}"

    def _log_plots(self, client, plans, metrics: dict, slices_hit) -> None:
        from sisa import plots

        m = self.manifest
        acc = _by_shard(metrics.get("shard_accuracy"))
        files = {"shard_sizes.png": plots.shard_sizes([[e["rows"] for e in sh["slices"]] for sh in m["shards"]])}
        if acc:
            before = _by_shard(metrics.get("shard_accuracy_before")) or None
            files["shard_accuracy.png"] = plots.shard_accuracy(acc, metrics.get("ensemble_accuracy"), before)
        if self.kind != "fit" and plans and m["shards"]:
            hit = {(int(s), int(j)) for s, j in (slices_hit or [])}
            starts = {p.shard: p.start_stage for p in plans}
            files["retrained_stages.png"] = plots.retrained_stages(
                len(m["shards"]), len(m["shards"][0]["slices"]), starts, hit
            )
        with tempfile.TemporaryDirectory() as tmp:
            for name, png in files.items():
                (Path(tmp) / name).write_bytes(png)
            client.log_artifacts(self.run_id, tmp, "plots")


@contextmanager
def _no_url_print():
    key = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    old = os.environ.get(key)
    os.environ[key] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _how(kind: str, plan) -> str:
    if plan.start_stage > 1:
        return f"retrained from the checkpoint after stage {plan.start_stage - 1}"
    return "trained" if kind == "fit" else "retrained from a fresh initialisation"


def _by_shard(d) -> dict[int, float]:
    return {int(k): v for k, v in (d or {}).items() if v is not None}
