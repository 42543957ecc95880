"""The bookkeeping an effective deletion still owes: its MLflow run (counts, cost, per-stage figures, plots,
phase timings), kept durable until the request is done.

A deletion is *effective* (`sisa.ledger.RequestState.EFFECTIVE`) once the retrained models serve and the
store holds no byte of its rows. What is left (re-evaluation, the run, the MLflow publish and the purge of
every superseded model version, see `sisa.ops.purge.settle`) is done behind that moment, batched over
every effective request. The run's material is written first to ``WORKDIR/owed/<request id>.json``
(atomic, fsynced) and removed when the request is done, so a process that dies in between loses nothing:
the next open logs it. The file holds counts, costs, stage figures and (shard, slice) positions: never a
row, never an id (raw or hashed).
"""

from __future__ import annotations

import json
import time
import warnings

from orchestration import ShardPlan
from sisa.workdir import write_atomic

DIR = "owed"
OP = "delete"


def path(workdir, rid: str):
    return workdir.path / DIR / f"{rid}.json"


def record(rid: str, before, receipt, plans, cost: dict, plan: dict, stages: dict, phases: dict) -> dict:
    """What the request's MLflow run will say (counts and hashes only, never raw ids)."""
    return {
        "request_id": rid,
        "plans": [{"shard": p.shard, "start_stage": p.start_stage} for p in plans],
        "stages": {str(s): v for s, v in stages.items()},
        "metrics": {
            "ensemble_accuracy_before": before.metrics.get("ensemble_accuracy"),
            "shard_accuracy_before": before.metrics.get("shard_accuracy"),
            "rows_deleted": receipt.rows_deleted,
            "eval_rows_deleted": receipt.eval_rows_deleted,
            "shards_retrained": len(plans),
            "wall_seconds": receipt.wall_seconds,
            **{k: v for k, v in cost.items() if v != float("inf")},
        },
        "tags": {"sisa.rows_deleted": receipt.rows_deleted},
        "slices_hit": plan["slices"],
        "phase_seconds": phases,
        "logged": False,
    }


def from_receipt(rid: str, receipt, plan: dict) -> dict:
    """The record of a request whose process died before writing one: what its receipt says (no stage
    figures: they lived in the dead process)."""
    shards = receipt.shards if receipt is not None else {}
    return {
        "request_id": rid,
        "plans": [{"shard": int(s), "start_stage": int(v["from_stage"])} for s, v in sorted(shards.items())],
        "stages": {},
        "metrics": {
            "rows_deleted": receipt.rows_deleted if receipt else 0,
            "eval_rows_deleted": receipt.eval_rows_deleted if receipt else 0,
            "shards_retrained": len(shards),
            **{k: v for k, v in (receipt.cost if receipt else {}).items() if v != float("inf")},
        },
        "tags": {"sisa.rows_deleted": receipt.rows_deleted if receipt else 0},
        "recovered": True,
        "slices_hit": plan.get("slices", []),
        "phase_seconds": {},
        "logged": False,
    }


def write(workdir, rid: str, rec: dict) -> None:
    (workdir.path / DIR).mkdir(exist_ok=True)
    write_atomic(path(workdir, rid), json.dumps(rec, default=float).encode())


def load(workdir, rid: str) -> dict | None:
    p = path(workdir, rid)
    return json.loads(p.read_text()) if p.exists() else None


def remove(workdir, rid: str) -> None:
    path(workdir, rid).unlink(missing_ok=True)


def log_run(ctx, m, rec: dict, metrics: dict, note: str | None = None) -> str | None:
    """Replay the request's events to the observer (an MLflow parent run with a child per retrained shard)
    on manifest ``m``; ``metrics``: the evaluation of ``m`` ({} for a request that is not the batch's last).
    Marks the record logged, so a crash after it does not log the run twice. Returns the run id."""
    if rec.get("recovered"):
        return _log_killed(ctx, m, rec)
    obs = ctx.observer
    plans = [ShardPlan(shard=p["shard"], start_stage=p["start_stage"], slices=[]) for p in rec["plans"]]
    obs.started(OP, m, {"sisa.request_id": rec["request_id"]})
    for p in plans:
        for st in rec["stages"].get(str(p.shard), []):
            obs.stage(OP, p, None, st)
    figures = {**rec["metrics"], **metrics, "plots": note is None and ctx.config.tracking.deletion_plots}
    figures.update({f"phase_seconds/{k}": v for k, v in rec.get("phase_seconds", {}).items()})
    tags = dict(rec["tags"])
    if note:
        tags["sisa.evaluated"] = note
    obs.finished(OP, m, plans, figures, tags, rec["slices_hit"])
    if obs.run_id is not None or not ctx.config.tracking.enabled:  # a failed log (MLflow down) is retried
        write(ctx.workdir, rec["request_id"], {**rec, "logged": True})
    return obs.run_id


def _log_killed(ctx, m, rec: dict) -> None:
    """The run of a request whose process died before it was effective: its counts and cost, closed as
    KILLED with a note (`sisa.tracking.runs.Tracker.settle`); the stage figures died with the process."""
    if not ctx.config.tracking.enabled:
        return None
    from mlflow.entities import Metric

    try:
        tracker = ctx.tracker()
        _, run_id = tracker.start_run(OP, m, {"sisa.request_id": rec["request_id"], **rec["tags"]})
        flat = {k: v for k, v in rec["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        now = int(time.time() * 1000)
        tracker.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in flat.items()])
        tracker.settle(rec["request_id"])
    except Exception as e:  # noqa: BLE001 - logging never fails an operation; the publish that follows may
        warnings.warn(f"MLflow run of request {rec['request_id']} not logged ({type(e).__name__}: {e})", stacklevel=2)
        return None
    write(ctx.workdir, rec["request_id"], {**rec, "logged": True})
    return None
