"""Purges: every copy of erased rows that sisa holds, in one place, and the two moments of a deletion.

*Effective* (`effective`): the store's superseded slices and checkpoints (zeroed, then removed), temp files
and stale copies in the workdir and the warm workers' caches are purged, and the request moves to
``effective`` with its owed bookkeeping durable (`sisa.ops.owed`). From then on the new models serve and
the store holds no byte of the rows.

*Done* (`settle`): for every effective request, in one batch, the held-out rows are evaluated again
(incrementally, `sisa.context.OpContext.evaluate`), one MLflow run is logged for the batch, the ensemble is
published and every MLflow registered version and logged model that saw the rows is purged; only then is
each request marked done. If a step fails (MLflow down, say), the requests stay effective and the next open
(or `SisaEnsemble.settle`, or the next deletion with ``wait="done"``) finishes them. The run is such a step
although its logging never raises (`sisa.tracking.observer.Safe`): a request whose run was not logged stays
effective, its owed record kept, after the publish and purge went ahead.

`finish` is the single-step form that additions and compactions use (retraining -> done).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace

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


def _store(ctx, m: Manifest, ph: Phases | None = None) -> None:
    ph = ph or Phases()
    with ph("store_purge"):
        unreferenced(ctx, m, on_delete=lambda: crashpoint("during_purge"))
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


def effective(ctx, m: Manifest, rid: str, receipt, rec: dict | None, ph: Phases, wait: str = "done", ahead=None):
    """After the swap to ``m``: purge the store, record the owed bookkeeping ``rec`` (None: keep the one a
    crashed attempt wrote, else rebuild it from the receipt), mark the request effective; with
    ``wait="done"`` settle every effective request too (``ahead``: what was prepared for it while the shards
    retrained, `sisa.ops.overlap`, which publishes ``m`` once it is effective, beside the evaluation and
    the run). Returns the receipt with its ``timing``."""
    _store(ctx, m, ph)
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
    if ahead is not None:
        ahead.publish(m)
    if wait == "done" and rid in settle(ctx, ph, ahead):  # else its run is still owed (settle warned)
        timing.update(state="done", done_at=time.time(), seconds_to_done=ph.mark("done"))
    timing["phase_seconds"] = dict(ph.seconds)
    return replace(receipt, timing=timing) if receipt is not None else None


def _plan(ctx, rid: str) -> dict:
    return next((r["plan"] for r in ctx.ledger().unfinished() if r["id"] == rid), {})


def settle(ctx, ph: Phases | None = None, ahead=None) -> list[str]:
    """Finish what every effective deletion owes, in one batch (hold the workdir lock): one evaluation of
    the served ensemble, one MLflow run for the batch, one publish that purges every other model version;
    then each request whose run was logged is done. Returns their ids. ``ahead`` (`sisa.ops.overlap`):
    the outputs, run and staged version prepared while the last request's shards retrained."""
    ph = ph or Phases()
    ledger = ctx.ledger()
    todo = [r for r in ledger.unfinished() if r["state"] == RequestState.EFFECTIVE]
    if not todo:
        return []
    m = ctx.read_manifest()
    with ph("evaluate"):
        if ahead is not None:
            ahead.ready()
        metrics = ctx.evaluate(m)
    if metrics:
        with ph("metrics_commit"):
            m = m.with_metrics(**metrics)
            ctx.commit(m)
    run_id, last = None, todo[-1]["id"]
    with ph("mlflow_logging"):  # one run for the batch
        recs = [
            owed.load(ctx.workdir, r["id"]) or owed.from_receipt(r["id"], _receipt(ctx, r["id"]), r["plan"])
            for r in todo
        ]
        run_id = owed.log_batch(ctx, m, [rec for rec in recs if not rec.get("logged")], metrics)
    crashpoint("during_settle")
    with ph("mlflow_publish"):  # the new version; every version that saw deleted rows is purged
        if ahead is None or not ahead.published():
            ctx.publish(m, purge=True, request_id=last, run_id=run_id)
        elif ctx.config.tracking.enabled:
            from sisa.tracking.registry import empty_log

            empty_log(ctx.tracker())  # after the run: every write of the batch is in the database
    crashpoint("before_done")
    with ph("ledger_done"):
        done = [r["id"] for r in todo if not owed.unlogged(ctx, r["id"])]
        for rid in done:
            receipt = _receipt(ctx, rid)
            ledger.set_state(rid, RequestState.DONE, receipt.to_dict() if receipt else None)
            owed.remove(ctx.workdir, rid)
    if len(done) < len(todo):
        warnings.warn(
            f"{len(todo) - len(done)} deletion request(s) stay effective: their MLflow run was not logged (see the "
            "warning above; their models are published and purged). The next settle or open logs it",
            RuntimeWarning,
            stacklevel=2,
        )
    return done
