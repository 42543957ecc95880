"""Purges: every copy of erased rows that sisa holds, in one place, and the two moments of a deletion.

*Effective* (`effective`): the store's superseded slices and checkpoints (zeroed, then removed), temp files
and stale copies in the workdir and the warm workers' caches are purged, and the request moves to
``effective`` with its owed bookkeeping durable (`sisa.ops.owed`). From then on the new models serve and
the store holds no byte of the rows.

*Done* (`settle`): for every effective request, in one batch, the ensemble is published and every MLflow
registered version and logged model that saw the rows is purged; then each request is marked done: no copy
of its rows is left anywhere. If that fails (MLflow down, say), the requests stay effective and the next
open (or `SisaEnsemble.settle`, or the next deletion with ``wait="done"``) finishes them. Behind that
moment comes the bookkeeping: the held-out rows are evaluated again (incrementally,
`sisa.context.OpContext.evaluate`) and one MLflow run is logged for the batch (started before the publish,
so that the new version links to it). Its logging never raises (`sisa.tracking.observer.Safe`): a run
that was not logged keeps its owed record, and the next settle or open logs it.

`finish` is the single-step form that additions and compactions use (retraining -> done).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace

from shards.errors import WorkdirError
from sisa import evalfile
from sisa.failpoints import crashpoint
from sisa.ledger import RequestState
from sisa.manifest import Manifest
from sisa.ops import owed, receipts
from sisa.ops.phases import Phases
from sisa.workdir import purge_unreferenced

WAITS = ("effective", "done")


def unreferenced(ctx, m: Manifest | None, on_delete=None) -> list[str]:
    """Store files ``m`` does not name (None: all of them)."""
    return purge_unreferenced(ctx.storage(), m, on_delete=on_delete)


def _store(ctx, m: Manifest, ph: Phases | None = None, superseded: list[str] | None = None) -> None:
    """``superseded``: every store file the operation left unreferenced, when it knows them all (a retrain
    with no stage retried: nothing half-written); None: list the store and purge what ``m`` does not name."""
    ph = ph or Phases()
    with ph("store_purge"):
        if superseded is None:
            unreferenced(ctx, m, on_delete=lambda: crashpoint("during_purge"))
        else:
            ctx.storage().delete_many(superseded, on_delete=lambda: crashpoint("during_purge"))
        ctx.workdir.remove_stale_copies()  # temp files, a killed fit's spill and evaluation file
        evalfile.discard_old(ctx.workdir.path)  # a superseded evaluation file a crash left unzeroed
    with ph("worker_caches"):
        ctx.drop_caches()


def finish(ctx, m: Manifest, rid: str, receipt, run_id: str | None) -> None:
    """Purge what the swap superseded, everywhere, then mark the request done."""
    _store(ctx, m)
    ctx.publish(m, purge=True, request_id=rid, run_id=run_id)  # the new version; every other one is deleted
    if receipt is None:
        receipt = _receipt(ctx, rid)
    ctx.ledger().set_state(rid, RequestState.DONE, receipt.to_dict() if receipt else None)


def _receipt(ctx, rid: str):
    return receipts.load(ctx.workdir, rid) if receipts.path(ctx.workdir, rid).exists() else None


def effective(
    ctx, m: Manifest, rid: str, receipt, rec: dict | None, ph: Phases, wait: str = "done", ahead=None, superseded=None
):
    """After the swap to ``m``: purge the store (``superseded``: the files to purge, see `_store`), record the owed bookkeeping ``rec`` (None: keep the one a
    crashed attempt wrote, else rebuild it from the receipt), mark the request effective; with
    ``wait="done"`` settle every effective request too (``ahead``: what was prepared for it while the shards
    retrained, `sisa.ops.overlap`). Returns the receipt with its ``timing``."""
    _store(ctx, m, ph, superseded)
    if receipt is None:
        receipt = _receipt(ctx, rid)
    with ph("owed_record"):
        if rec is not None or owed.load(ctx.workdir, rid) is None:
            rec = rec or owed.from_receipt(rid, receipt, _plan(ctx, rid))
            rec["phase_seconds"] = dict(ph.seconds)
            owed.write(ctx.workdir, rid, rec)
    crashpoint("before_effective")
    with ph("ledger_commit"):
        ctx.ledger().set_state(rid, RequestState.EFFECTIVE)
    timing = {"state": "effective", "effective_at": time.time(), "seconds_to_effective": ph.mark("effective")}
    crashpoint("after_effective")
    if wait == "done" and rid in settle(ctx, ph, ahead):
        done, now = ph.moments["done"], time.perf_counter() - ph.t0
        timing.update(state="done", done_at=time.time() - (now - done), seconds_to_done=done)
        timing["seconds_to_logged"] = ph.moments["logged"]  # the evaluation and the run, behind done
    timing["phase_seconds"] = dict(ph.seconds)
    return replace(receipt, timing=timing) if receipt is not None else None


def _plan(ctx, rid: str) -> dict:
    return next((r["plan"] for r in ctx.ledger().unfinished() if r["id"] == rid), {})


def settle(ctx, ph: Phases | None = None, ahead=None) -> list[str]:
    """Finish what every effective deletion owes, in one batch (hold the workdir lock). First every copy:
    one publish that purges every model version that saw their rows; then each request is *done* (the
    moment ``ph`` marks). Then, behind that moment, the bookkeeping: one evaluation of the served ensemble
    and one MLflow run for the batch (started before the publish, so that the new version links to it),
    after which each request's owed record is removed. A record whose run could not be logged stays, and
    the next settle or open logs it, as it does for requests done by a process that died before logging.
    Returns the ids of the requests now done. ``ahead`` (`sisa.ops.overlap`): the run and the staged
    version prepared while the last request's shards retrained."""
    ph = ph or Phases()
    ledger = ctx.ledger()
    todo = [r for r in ledger.unfinished() if r["state"] == RequestState.EFFECTIVE]
    later = owed.settle_order(ctx, [r["id"] for r in todo])[len(todo) :]  # done, their run still owed
    for rid in later:  # logged, and killed before its record went
        if (owed.load(ctx.workdir, rid) or {}).get("logged"):
            owed.remove(ctx.workdir, rid)
    later = [rid for rid in later if owed.load(ctx.workdir, rid) is not None]
    if not todo and not later:
        return []
    m = ctx.read_manifest()
    recs = [
        owed.load(ctx.workdir, r["id"]) or owed.from_receipt(r["id"], _receipt(ctx, r["id"]), r["plan"]) for r in todo
    ]
    recs = [r for r in recs + [owed.load(ctx.workdir, rid) for rid in later] if r and not r.get("logged")]
    with ph("mlflow_logging"):
        if ahead is not None:
            ahead.ready()
        run_id = owed.open_batch(ctx, m, recs)
    crashpoint("during_settle")
    if todo:
        with ph("mlflow_publish"):  # the new version; every version that saw deleted rows is purged
            staged = ahead.staged() if ahead is not None else None
            ctx.publish(m, purge=True, request_id=todo[-1]["id"], run_id=run_id, staged=staged)
        crashpoint("before_done")
        with ph("ledger_done"):
            for r in todo:
                receipt = _receipt(ctx, r["id"])
                ledger.set_state(r["id"], RequestState.DONE, receipt.to_dict() if receipt else None)
        ph.mark("done")
        crashpoint("after_done")
    _bookkeeping(ctx, m, recs, ph)
    return [r["id"] for r in todo]


def _bookkeeping(ctx, m: Manifest, recs: list[dict], ph: Phases) -> None:
    """Behind *done*: the evaluation, the batch's run, then the owed records removed (those logged)."""
    with ph("evaluate"):
        metrics = ctx.evaluate(m)
    if metrics:
        with ph("metrics_commit"):
            m = m.with_metrics(**metrics)
            ctx.commit(m)
    with ph("mlflow_logging"):
        owed.close_batch(ctx, m, recs, metrics)
        if ctx.config.tracking.enabled:
            from sisa.tracking.superseded import empty_log

            try:
                empty_log(ctx.tracker())  # the run's pages too: the log is left empty
            except WorkdirError as e:  # a reader holds it: no erased byte is in these pages, the next purge empties it
                warnings.warn(str(e), RuntimeWarning, stacklevel=3)
    left = [r["request_id"] for r in recs if owed.unlogged(ctx, r["request_id"])]
    crashpoint("before_owed_removed")  # logged: the next settle only removes the records
    for rec in recs:
        if rec["request_id"] not in left:
            owed.remove(ctx.workdir, rec["request_id"])
    ph.mark("logged")
    if left:
        warnings.warn(
            f"the MLflow run of {len(left)} deletion request(s) is still owed (see the warning above; the requests "
            "are done: their models are published and purged everywhere). The next settle or open logs it",
            RuntimeWarning,
            stacklevel=3,
        )
