"""The bookkeeping a deletion still owes: its MLflow run (counts, cost, per-stage figures, plots, phase
timings), kept durable until the run is logged.

A deletion is *effective* (`sisa.ledger.RequestState.EFFECTIVE`) once the retrained models serve and the
store holds no byte of its rows. What is left (re-evaluation, the run, the MLflow publish and the purge of
every superseded model version, see `sisa.ops.purge.settle`) is done behind that moment, batched over
every effective request; the run follows the moment the request is done. The run's material is written
first to ``WORKDIR/owed/<request id>.json`` (atomic, fsynced) and removed once the run is logged, so a
process that dies in between loses nothing: the next open logs it. The file holds counts, costs, stage figures and (shard, slice) positions: never a
row, never an id (raw or hashed).
"""

from __future__ import annotations

import json
import time
import warnings

from orchestration import ShardPlan
from sisa.failpoints import crashpoint
from sisa.tracking.runs import REQUEST_ID, REQUEST_IDS
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


def unlogged(ctx, rid: str) -> bool:
    """The request's MLflow run is still owed: tracking is on and its record is not marked logged."""
    return ctx.config.tracking.enabled and not (load(ctx.workdir, rid) or {}).get("logged")


def open_batch(ctx, m, recs: list[dict]) -> str | None:
    """Start the MLflow run of a batch of requests, on manifest ``m`` (or adopt the one a deletion started
    ahead, `sisa.ops.overlap`), so that the version the batch publishes links to it; a request whose process
    died before it was effective gets its own run, closed as KILLED (`_log_killed`). Returns the run's id."""
    for rec in recs:
        if rec.get("recovered") and not rec.get("logged"):
            _log_killed(ctx, m, rec)
    live = [r for r in recs if not r.get("recovered")]
    if not live:
        return None
    obs = ctx.observer
    tags = batch_tags([r["request_id"] for r in live])
    if not obs.adopt(tags):
        obs.started(OP, m, tags)
        crashpoint("batch_run_started")  # a dead process's run stays RUNNING: the next attempt closes it as KILLED
    return obs.run_id


def close_batch(ctx, m, recs: list[dict], metrics: dict) -> str | None:
    """Log the batch run `open_batch` started and close it: its children are the retrained shards (a shard
    retrained by several requests: one child with all their stages), its metrics the evaluation of ``m``
    (``metrics``) and, for more than one request, the batch's totals and each request's own figures under
    ``request/`` at step i (its place in the batch). Marks every record logged, so a crash after it does
    not log the runs twice. Returns the run's id, None if it was not logged (its records stay owed)."""
    live = [r for r in recs if not r.get("recovered")]
    if not live:
        return None
    obs = ctx.observer
    first: dict[int, int] = {}
    for rec in live:
        for p in rec["plans"]:
            plan = ShardPlan(shard=p["shard"], start_stage=p["start_stage"], slices=[])
            first[plan.shard] = min(first.get(plan.shard, plan.start_stage), plan.start_stage)
            for st in rec["stages"].get(str(plan.shard), []):
                obs.stage(OP, plan, None, st)
    plans = [ShardPlan(shard=s, start_stage=k, slices=[]) for s, k in sorted(first.items())]
    figures, tags = _figures(live, metrics)
    figures["plots"] = ctx.config.tracking.deletion_plots
    slices_hit = sorted({tuple(x) for r in live for x in r["slices_hit"]})
    obs.finished(OP, m, plans, figures, tags, slices_hit)
    if obs.finished_run is not None or not ctx.config.tracking.enabled:  # a failed log (MLflow down) is retried
        for rec in live:
            write(ctx.workdir, rec["request_id"], {**rec, "logged": True})
    return obs.finished_run


def settle_order(ctx, effective: list[str]) -> list[str]:
    """The requests a settle takes, in its order: the ``effective`` ones, then those done whose run is still
    owed (`pending`). A run started ahead (`sisa.ops.overlap`) names the same ones, so that it is adopted."""
    return effective + [rid for rid in pending(ctx.workdir) if rid not in set(effective)]


def pending(workdir) -> list[str]:
    """Requests whose bookkeeping is still owed (their record is here), oldest first."""
    d = workdir.path / DIR
    files = sorted(d.glob("*.json"), key=lambda f: f.stat().st_mtime_ns) if d.is_dir() else []
    return [f.stem for f in files]


def batch_tags(ids: list[str]) -> dict:
    """The tags naming a batch run's requests (the list is capped in `sisa.tracking.runs.Tracker.start_run`)."""
    return {REQUEST_ID: ids[0]} if len(ids) == 1 else {REQUEST_IDS: ",".join(ids)}


def live_ids(ctx, effective: list[str]) -> list[str]:
    """Of the ``effective`` requests, those the next batch run names: their record is there, not logged, and
    not one of a process that died before it was effective (those get runs of their own, `_log_killed`)."""
    recs = [load(ctx.workdir, rid) for rid in effective]
    return [
        rid
        for rid, rec in zip(effective, recs)
        if rec is not None and not rec.get("logged") and not rec.get("recovered")
    ]


def _figures(live: list[dict], metrics: dict) -> tuple[dict, dict]:
    """(metrics, tags) of a batch run: one request's own figures, or the totals and each one's at its step."""

    def own(rec):
        return {**rec["metrics"], **{f"phase_seconds/{k}": v for k, v in rec.get("phase_seconds", {}).items()}}

    if len(live) == 1:
        return {**own(live[0]), **metrics}, dict(live[0]["tags"])
    rows = sum(r["metrics"].get("rows_deleted", 0) for r in live)
    figures = {
        **{k: live[0]["metrics"].get(k) for k in ("ensemble_accuracy_before", "shard_accuracy_before")},
        **metrics,
        "requests": len(live),
        "rows_deleted": rows,
        "eval_rows_deleted": sum(r["metrics"].get("eval_rows_deleted", 0) for r in live),
        "wall_seconds": sum(r["metrics"].get("wall_seconds") or 0.0 for r in live),
        "per_request": [own(r) for r in live],
    }
    return figures, {"sisa.rows_deleted": rows}


def _log_killed(ctx, m, rec: dict) -> None:
    """The run of a request whose process died before it was effective: its counts and cost, closed as
    KILLED with a note (`sisa.tracking.runs.Tracker.settle`); the stage figures died with the process."""
    if not ctx.config.tracking.enabled:
        return None
    from mlflow.entities import Metric

    try:
        tracker, rid = ctx.tracker(), rec["request_id"]
        dead = [run for run, rids in tracker.settle([rid]) if rids == [rid]]  # started ahead, `sisa.ops.overlap`
        run_id = dead[0] if dead else tracker.start_run(OP, m, {REQUEST_ID: rid, **rec["tags"]})[1]
        flat = {k: v for k, v in rec["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        now = int(time.time() * 1000)
        tracker.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in flat.items()])
        if not dead:
            tracker.settle([rid])
    except Exception as e:  # noqa: BLE001 - logging never fails an operation; the publish that follows may
        warnings.warn(f"MLflow run of request {rec['request_id']} not logged ({type(e).__name__}: {e})", stacklevel=2)
        return None
    write(ctx.workdir, rec["request_id"], {**rec, "logged": True})
    return None
