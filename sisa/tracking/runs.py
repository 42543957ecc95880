"""MLflow tracking: one experiment per ensemble, a parent run per operation, a child run per shard.

`MLflowObserver` turns an operation's events (`sisa.tracking.observer.Observer`) into MLflow runs: at
``started`` a parent run with the config's params and YAML; at each ``stage`` the driver keeps the stage's
figures; at ``finished`` a child run per trained shard (per-stage and per-epoch loss, accuracy, duration,
samples), the parent's ensemble metrics, note and PNG plots; at ``failed`` the run is marked FAILED.
`observer_for(ctx)` gives the ensemble's observer (a no-op when tracking is off). Logging never fails an
operation (`Safe`). `Tracker.publish` is not logging: it registers the ensemble version as a pyfunc model
(`sisa.tracking.registry`) and, after a deletion, purges every version that saw the deleted rows.

Workers never talk to MLflow: they return their metrics and the driver logs them in a few batched calls
when the operation ends, so one sqlite file never has several writers and logging stays cheap (on a
cluster, point ``tracking.uri`` at an MLflow server). No raw rows or raw ids are ever logged; deletions
are described by counts and keyed hashes only. mlflow is imported only when tracking is enabled.

A batch run names its deletion requests (request ids, never row ids) in the tag ``sisa.request_ids``, cut
to the ids that fit MLflow's limit on a tag value (a SQL store's column holds 8,000 characters), with
their count in ``sisa.requests`` and the full list in the run's artifact ``request_ids.json``.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

from sisa.config import dump_yaml
from sisa.tracking import adapter
from sisa.tracking.adapter import sqlite_path  # noqa: F401  (re-exported: `sisa ui`, the audit)
from sisa.tracking.child import by_shard as _by_shard
from sisa.tracking.child import log_child as _log_child
from sisa.tracking.child import no_url_print as _no_url_print
from sisa.tracking.observer import Observer, Safe

REQUEST_ID = "sisa.request_id"  # the run of one deletion request
REQUEST_IDS = "sisa.request_ids"  # a batch run's requests: as many as fit, in order
REQUESTS = "sisa.requests"  # a batch run's number of requests
REQUEST_IDS_FILE = "request_ids.json"  # a batch run's artifact: every request id, in order
TAG_LIMIT = 8000  # MLflow's longest tag value (mlflow.utils.validation.MAX_TAG_VAL_LENGTH)


def default_uri(workdir) -> str:
    return f"sqlite:///{workdir.path / 'mlflow.db'}"


class Tracker:
    def __init__(self, config, workdir, uri: str | None = None):
        self.config, self.workdir = config, workdir
        self.enabled = config.tracking.enabled
        self.uri = uri or config.tracking.uri or default_uri(workdir)
        self.experiment = config.tracking.experiment or f"sisa-{config.name}-{workdir.path.name}"
        self.model_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.experiment)
        self._client = None
        self._experiment_id: str | None = None
        self.zeroing = False  # sqlite deletes zero the freed bytes (`adapter.zero_on_delete`): no VACUUM

    @property
    def client(self):
        if self._client is None:
            self._client = adapter.client(self.uri)
            self.zeroing = adapter.zero_on_delete(self._client, self.uri)
        return self._client

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._find_or_create_experiment()
        return self._experiment_id

    def _find_or_create_experiment(self) -> str:
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

    def start_run(self, kind: str, manifest, tags: dict) -> tuple[str, str]:
        """Create the parent run of an operation with the config's params and YAML; (experiment, run id)."""
        from mlflow.entities import Param

        c = self.config
        exp = self.experiment_id()
        rids = _request_ids(tags)
        if rids:  # a re-run after a crash: the dead attempt's run is closed first
            self.settle(rids)
        if REQUEST_IDS in tags:
            tags = {**tags, REQUEST_IDS: capped(rids), REQUESTS: str(len(rids))}
        title = kind
        if rids:  # "delete 794324d0 (+2)": the request id's random part (full ids in the tags)
            title += f" {rids[0].rsplit('-', 1)[-1]}" + (f" (+{len(rids) - 1})" if len(rids) > 1 else "")
        run = self.client.create_run(
            exp,
            run_name=title,
            tags={
                "sisa.operation": kind,
                "sisa.config_hash": manifest.config_hash,
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
            "config_hash": manifest.config_hash,
            "executor": c.cluster.executor,
        }
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        self.client.log_text(run.info.run_id, dump_yaml(c, redact=True), "config.yaml")
        if REQUEST_IDS in tags:
            self.client.log_text(run.info.run_id, json.dumps({"request_ids": rids}), REQUEST_IDS_FILE)
        return exp, run.info.run_id

    def publish(
        self,
        ctx,
        m,
        run_id: str | None = None,
        purge: bool = False,
        request_id: str | None = None,
        force: bool = False,
        staged=None,
    ):
        """Log ``m``'s ensemble as a registered pyfunc model version (alias ``current``); with ``purge``,
        delete every other version of it and its artifacts. Idempotent (``force``: log a new version even if
        ``current`` is already this ensemble). None when disabled.
        ``request_id`` without ``run_id``: a request finished on reopen; its dead attempt's run is closed.
        ``staged``: a version prepared ahead (`sisa.tracking.registry.stage`)."""
        if not self.enabled:
            return None
        from sisa.tracking.registry import publish

        if request_id is not None and run_id is None:
            self.settle([request_id])
        return publish(self, ctx, m, run_id, purge, force, staged)

    def settle(self, request_ids: list[str]) -> list[tuple[str, list[str]]]:
        """Mark the runs of the requests' attempts that died (still RUNNING) as KILLED, noting that. Returns
        (run id, the request ids it names) of each."""
        want, closed = set(request_ids), []
        running = self.client.search_runs([self.experiment_id()], filter_string="attributes.status = 'RUNNING'")
        dead = {r.info.run_id for r in running if want & set(_request_ids(r.data.tags))}
        for r in running:
            if r.data.tags.get("mlflow.parentRunId") in dead:  # a shard's child run cut short with its parent
                with _no_url_print():
                    self.client.set_terminated(r.info.run_id, "KILLED")
            if r.info.run_id not in dead:  # a batch's first ids: a retry's batch starts with them
                continue
            closed.append((r.info.run_id, _request_ids(r.data.tags)))
            self.client.set_tag(
                r.info.run_id,
                "mlflow.note.content",
                "The process died here; the request was finished when the workdir was reopened.",
            )
            with _no_url_print():
                self.client.set_terminated(r.info.run_id, "KILLED")
        return closed


def _request_ids(tags: dict) -> list[str]:
    return [r for r in (tags.get(REQUEST_ID) or tags.get(REQUEST_IDS, "")).split(",") if r]


def capped(rids: list[str], limit: int = TAG_LIMIT) -> str:
    """The comma-separated ids, as many whole ones from the first as fit in ``limit`` characters."""
    joined = ",".join(rids)
    return joined if len(joined) <= limit else joined[: limit + 1].rpartition(",")[0]


def observer_for(ctx) -> Observer:
    """The ensemble's tracking observer: MLflow runs when ``tracking.enabled``, else nothing."""
    return Safe(MLflowObserver(ctx)) if ctx.config.tracking.enabled else Observer()


class _Op:
    """The parent run of the operation in progress and the stage figures collected for it."""

    def __init__(self, tracker: Tracker, exp: str, run_id: str, kind: str, tags: dict):
        self.tracker, self.exp, self.run_id, self.kind, self.tags = tracker, exp, run_id, kind, tags
        self.stages: dict[int, list[dict]] = {}
        self.t0 = time.time()


class MLflowObserver(Observer):
    """Logs each operation as an MLflow parent run with one child run per trained shard.

    The config is read from ``ctx.config`` when an operation starts (fit fills in ``num_classes``).
    ``run_id`` names the last operation's parent run (the registered model version links to it)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.run_id: str | None = None
        self._op: _Op | None = None

    def started(self, op: str, manifest, tags: dict) -> None:
        self._op, self.run_id, self.finished_run = None, None, None
        if not self.ctx.config.tracking.enabled:
            return
        tracker = self.ctx.tracker()
        tags = {k: str(v) for k, v in (tags or {}).items()}
        exp, run_id = tracker.start_run(op, manifest, tags)
        self._op, self.run_id = _Op(tracker, exp, run_id, op, tags), run_id

    def adopt(self, tags: dict) -> bool:
        op = self._op
        if op is None or op.tags != {k: str(v) for k, v in tags.items()}:
            return False
        op.stages = {}
        return True

    def stage(self, op: str, plan, entry: dict, metrics: dict) -> None:
        """Called on the driver as each stage result arrives (workers never log)."""
        if self._op is not None:
            # a replayed stage (a deletion logs its run once it is effective) carries its own end time
            self._op.stages.setdefault(plan.shard, []).append({"_end": time.time(), **metrics})

    def failed(self, op: str, error: BaseException) -> None:
        run, self._op = self._op, None
        if run is not None:
            run.tracker.client.set_terminated(run.run_id, "FAILED")

    def finished(self, op: str, manifest, plans: list, metrics: dict, tags: dict, slices_hit) -> None:
        """Log the shard child runs, the parent's ensemble metrics, tags and plots; close the run.

        ``metrics`` may hold ``shard_accuracy`` / ``shard_accuracy_before`` ({shard: acc}) for the plots;
        ``slices_hit`` the (shard, slice) pairs (0-based) that held deleted rows, for the heat map; ``tags``
        may carry the note (``mlflow.note.content``)."""
        from mlflow.entities import Metric

        run, self._op, self.finished_run = self._op, None, None
        if run is None:
            return
        client = run.tracker.client
        now = int(time.time() * 1000)
        epochs = list(self.ctx.config.epochs_per_stage())
        sample_epochs = sum(_log_child(run, manifest, plan, metrics, epochs) for plan in plans)
        flat = {k: v for k, v in metrics.items() if _number(v)}
        flat.setdefault("wall_seconds", time.time() - run.t0)  # a deletion passes its own (to effective)
        flat["shards_trained"] = len(plans)
        flat.setdefault("sample_epochs", sample_epochs)  # a deletion passes its cost figures
        flat["rows"] = sum(sh.rows for sh in manifest.shards)
        from mlflow.entities import RunTag

        ms = [Metric(k, float(v), now, 0) for k, v in flat.items()]
        for i, own in enumerate(metrics.get("per_request", [])):  # a batch of requests: each at its step
            ms += [Metric(f"request/{k}", float(v), now, i) for k, v in own.items() if _number(v)]
        for s, acc in sorted(_by_shard(metrics.get("shard_accuracy")).items()):
            ms.append(Metric("shard_test_accuracy", float(acc), now, s))
        tags = {k: str(v) for k, v in (tags or {}).items()}
        tags.setdefault("mlflow.note.content", _note(run.kind, manifest, plans, flat))
        client.log_batch(run.run_id, metrics=ms, tags=[RunTag(k, v) for k, v in tags.items()])  # one transaction
        if metrics.get("plots", True):  # a batch of settled deletions plots the state once, on its last run
            _log_plots(run, manifest, plans, metrics, slices_hit)
        client.set_terminated(run.run_id, "FINISHED")
        self.finished_run = run.run_id


def _note(kind: str, manifest, plans, flat: dict) -> str:
    acc = flat.get("ensemble_accuracy")
    acc_s = f"test accuracy {acc:.4f}" if acc is not None else "no evaluation set"
    if kind == "fit":
        slices = len(manifest.shards[0].slices) if manifest.shards else 0
        return f"Trained {len(plans)} shards × {slices} slices; {acc_s}."
    if kind == "delete":
        before = flat.get("ensemble_accuracy_before")
        speed = flat.get("speedup")
        return (
            f"Deleted {int(flat.get('rows_deleted', 0))} row(s); retrained {len(plans)} shard(s) "
            + (f"at {speed:.1f}× less work than a full retrain; " if speed else "; ")
            + (f"test accuracy {before:.4f} → {acc:.4f}." if before is not None and acc is not None else acc_s)
        )
    tail = f"; test accuracy {acc:.4f}." if acc is not None else "."
    return f"{kind}: {len(plans)} shard(s) retrained{tail}" if plans else f"{kind}{tail}"


def _log_plots(run: _Op, manifest, plans, metrics: dict, slices_hit) -> None:
    from sisa.tracking import plots

    acc = _by_shard(metrics.get("shard_accuracy"))
    files = {"shard_sizes.png": plots.shard_sizes(manifest.slice_rows())}
    if acc:
        before = _by_shard(metrics.get("shard_accuracy_before")) or None
        files["shard_accuracy.png"] = plots.shard_accuracy(acc, metrics.get("ensemble_accuracy"), before)
    if run.kind != "fit" and plans and manifest.shards:
        hit = {(int(s), int(j)) for s, j in (slices_hit or [])}
        starts = {p.shard: p.start_stage for p in plans}
        files["retrained_stages.png"] = plots.retrained_stages(
            len(manifest.shards), len(manifest.shards[0].slices), starts, hit
        )
    with tempfile.TemporaryDirectory() as tmp:
        for name, png in files.items():
            (Path(tmp) / name).write_bytes(png)
        run.tracker.client.log_artifacts(run.run_id, tmp, "plots")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
