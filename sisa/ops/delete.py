"""The delete operation: `delete(ids)` retrains only the shards that held the ids, each from the checkpoint
taken before its earliest affected slice, and leaves no byte of the deleted rows behind.

Held-out evaluation rows (``eval.npy``, see `sisa.evalfile`) are erased too: they need no retraining, only
a rewrite of the evaluation file, so a request may hold training rows, evaluation rows or both.

Order of events (each step is safe to crash after; `recover` finishes the request on reopen):
  1. the request is committed to the ledger (hashed ids + which slices they sit in): the ack point;
  2. the slices are rewritten without the rows, into new files (with appended stages,
     ``sharding.new_rows: append``, the later appended stages too; an appended slice left empty is removed
     with its stage, `sisa.ops.append.squeeze`), and the shards' retrain is sent to the workers;
  3. while their first stages train: the affected shards are excluded from prediction (manifest commit,
     naming the request and its expected duration for predictors that wait, see `sisa.serving`), the
     evaluation file is rewritten without the request's rows (atomic, idempotent), and the done path's
     MLflow work that needs no new weights is started (`sisa.ops.overlap`);
  4. the retrain finishes, into new checkpoint files;
  5. the receipt is written, then the manifest switches to the new files (the atomic model swap);
  6. superseded slices and checkpoints are purged from the store, worker caches and stale copies dropped,
     the owed bookkeeping written (`sisa.ops.owed`) and the request marked *effective* (`sisa.ops.purge`);
  7. (``wait="done"``, the default, or later, batched: `sisa.ops.purge.settle`) the held-out rows are
     evaluated again (only the retrained shards' outputs are recomputed), the MLflow run logged, the new
     model published and every MLflow model version that saw the rows purged; the request marked done.

Each phase's wall time is measured (`sisa.ops.phases`) and returned in the receipt's ``timing``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace

from orchestration import ShardPlan
from shards.errors import ConfigError, DataError
from shards.ids import unique_request
from shards.store import read_slice, without, write_slice
from sisa import costmodel, evalfile
from sisa.failpoints import crashpoint
from sisa.ledger import RequestState
from sisa.manifest import Checkpoint, Manifest, Retraining, SliceRef
from sisa.ops import append, owed, purge, receipts
from sisa.ops.locate import base_error, base_rows_named, first_stages, locate, unknown_error
from sisa.ops.overlap import Overlap
from sisa.ops.phases import Phases
from sisa.ops.receipts import DeletionPlan, Receipt

OP = "delete"


def _normalise(m: Manifest, ids) -> list:
    """The request's ids, canonical (see `shards.ids`): a scalar is one id, the ensemble's kind only."""
    try:
        return unique_request(ids, m.id_kind)
    except DataError as e:
        if "no ids given" in e.message:
            raise DataError("delete() needs at least one id; got an empty list", ids=[]) from None
        raise


def estimate(ctx, m: Manifest, ids) -> DeletionPlan:
    """What `delete(ids)` would do and cost, without changing anything."""
    ids = _normalise(m, ids)
    found, held, gone, unknown = locate(ctx, m, ids)
    if unknown:
        raise _unknown(ctx, m, unknown)
    starts = first_stages(found)
    rows = [list(r) for r in m.slice_rows()]
    for (s, j), g in found.items():  # priced on the partition after the deletion, as the receipt is
        rows[s][j] -= len(g)
    eps = m.schedules(ctx.config.epochs_per_stage())
    cost = costmodel.plan_cost(rows, eps, starts)
    weights = m.slice_risk()
    return DeletionPlan(
        shards=dict(sorted(starts.items())),
        rows=sum(map(len, found.values())),
        already_deleted=len(gone),
        sample_epochs=cost["sample_epochs"],
        full_retrain_sample_epochs=cost["full_retrain_sample_epochs"],
        speedup=cost["speedup"],
        eval_rows=len(held),
        expected_sample_epochs=None if weights is None else costmodel.expected_prior(m.slice_rows(), eps, weights),
    )


def _unknown(ctx, m: Manifest, unknown: list):
    """The error for ids not found in the shards: base rows (never erasable) are named as such."""
    base = base_rows_named(ctx, m, unknown)
    return base_error(len(base)) if base else unknown_error(ctx, unknown)


def _check_resume_points(ctx, m: Manifest, starts: dict[int, int]) -> None:
    """Refuse before the ledger commit if a file the retrain needs (the checkpoint it resumes from, the
    shard's slices) is damaged, so that a doomed request is never acknowledged."""
    store = ctx.storage()
    for s, r in starts.items():
        sh = m.shards[s]
        if r > 1:
            c = sh.checkpoints[r - 2]
            store.read(c.file, c.sha256)
        elif m.base is not None:  # stage 1 resumes from the shared start
            store.read(m.base.file, m.base.sha256)
        for e in sh.slices:
            store.read(e.file, e.sha256)


def delete(ctx, m: Manifest, ids, progress=None, wait: str = "done") -> Receipt:
    """Forget ``ids`` exactly. ``wait="done"``: return the signed receipt once no copy of their rows is left
    anywhere (MLflow included); ``wait="effective"``: once the new models serve and the store holds no byte
    of them, leaving the evaluation and MLflow work owed (durable; `sisa.ops.purge.settle` finishes it,
    batched, as does the next open or the next deletion that waits for done). ``receipt.timing`` says which."""
    if wait not in purge.WAITS:
        raise ConfigError(f"delete(wait={wait!r}): use 'effective' or 'done'", problems=["wait"])
    ph, t0 = Phases(), time.time()
    ids = _normalise(m, ids)
    with ctx.workdir.lock(what="delete"):
        with ph("recover"):  # effective ones stay owed: this request's settle takes them in its batch
            recover(ctx, locked=True, settle=False)
        with ph("preflight"):
            m = ctx.read_manifest()
            found, held, gone, unknown = locate(ctx, m, ids)
            if (unknown or not (found or held)) and wait == "done":
                purge.settle(ctx)
            if unknown:
                raise _unknown(ctx, m, unknown)
            if not found and not held:
                return Receipt(None, t0, time.time(), [], 0, len(gone), config_hash=m.config_hash)
            _check_resume_points(ctx, m, first_stages(found))
            hashed = ctx.workdir.hash_ids([i for g in found.values() for i in g] + sorted(held))
        plan = {"slices": sorted([s, j] for s, j in found), "eval_rows": len(held)}
        crashpoint("before_ledger")
        with ph("ledger_commit"):
            rid = ctx.ledger().record(hashed, plan)  # the ack point: from here on the deletion is never lost
        crashpoint("after_ledger")
        return _execute(ctx, m, rid, set(hashed), plan, t0, len(gone), progress, ph, wait, found)


def recover(ctx, locked: bool = False, wait: bool = True, settle: bool = True) -> list[str]:
    """Finish every request the ledger holds that is not done. Returns their ids.

    ``wait=False`` (`SisaEnsemble.open`): if another process holds the workdir, it is running the request
    (a crashed one holds no lock), so leave it to that process instead of blocking until it is done.
    ``settle=False``: requests that are effective already keep their owed bookkeeping for a later batch."""
    if not (ctx.workdir.path / "ledger.db").exists():
        return []
    todo = [r for r in ctx.ledger().unfinished() if r["plan"].get("kind", OP) == OP]  # additions: sisa.ops.add
    if not settle:
        todo = [r for r in todo if r["state"] != RequestState.EFFECTIVE]
    if not todo:
        return []
    if not locked:
        if not wait and ctx.workdir.busy():
            return []
        with ctx.workdir.lock(what="recovery"):
            return recover(ctx, locked=True, settle=settle)
    for req in todo:
        resume(ctx, req, "done" if settle else "effective")
    return [r["id"] for r in todo]


def resume(ctx, req: dict, wait: str = "done") -> None:
    """Finish one unfinished deletion request (hold the workdir lock)."""
    rid = req["id"]
    if req["state"] == RequestState.EFFECTIVE:  # only the bookkeeping is owed
        if wait == "done":
            purge.settle(ctx)
        return
    m = ctx.read_manifest()
    if rid in m.applied_requests:  # swapped before the crash: purge, effective, then (maybe) settle
        purge.effective(ctx, m, rid, None, None, Phases(), wait)
    else:
        ctx.workdir.remove_temp_files()
        purge.unreferenced(ctx, m)  # half-written files of the crashed attempt
        hashed = set(ctx.ledger().hashed_ids(rid))
        _execute(ctx, m, rid, hashed, req["plan"], time.time(), 0, None, Phases(), wait)


def _execute(
    ctx, before: Manifest, rid, hashed: set, plan: dict, t0: float, already: int, progress, ph, wait, found=None
):
    """Run a committed request. ``found`` (a fresh request, not a resumed one): its canonical ids by
    (shard, slice), as `locate` matched them; a resumed request has only the ledger's hashes."""
    affected = sorted({s for s, _ in plan["slices"]})
    with ph("slice_rewrite"):
        after, plans, removed, starts, written = _rewrite_slices(ctx, before, affected, plan, hashed, found)
    ahead = []

    def meanwhile():  # sent the retrain: what needs no new weights runs while the first stages train
        _exclude(ctx, before, rid, plan, ph)  # no prediction from a shard that saw the rows, from here on
        crashpoint("before_eval_rewrite")
        if plan.get("eval_rows", 1):  # the plan counted the held-out rows named; none: the file is not read
            with ph("eval_rewrite"):
                if evalfile.erase(ctx.workdir, hashed, before.id_kind):  # idempotent: a re-run finds nothing
                    ctx.forget_evaluations()  # cached predictions on the erased rows
        crashpoint("after_eval_rewrite")
        ahead.append(Overlap.start(ctx, before, rid, plans, wait))  # the done path's work ahead (MLflow)

    try:
        stages, wall = _retrain(ctx, after, plans, progress, meanwhile)
        cost = _cost(ctx, after, starts, before)
        _training_phases(ph, wall, stages)
        rate = wall / cost["sample_epochs"] if cost["sample_epochs"] else None
        for p in plans:
            done = before.shards[p.shard].checkpoints[: p.start_stage - 1]
            after = after.with_shard(p.shard, checkpoints=done + tuple(Checkpoint.from_dict(c) for c in p.checkpoints))
        for s in affected:
            after = after.with_shard(s, excluded=False)
        after = replace(after, retraining=None, applied_requests=(*before.applied_requests, rid))
        if rate is not None:
            after = after.with_metrics(seconds_per_sample_epoch=rate)
        with ph("receipt"):
            receipt = _receipt(ctx, rid, hashed, plan, before, plans, removed, cost, t0, already)
            receipts.write(ctx.workdir, receipt)
        crashpoint("before_swap")
        with ph("swap"):
            ctx.commit(after)  # the atomic swap
        crashpoint("after_swap")
        rec = owed.record(rid, before, receipt, plans, cost, plan, stages, {})
        superseded = _superseded(before, after, written, plans)
        return purge.effective(ctx, after, rid, receipt, rec, ph, wait, ahead[0], superseded)
    except BaseException:
        if ahead and ahead[0] is not None:
            ahead[0].abort()
        raise
    finally:
        if ahead and ahead[0] is not None:
            ahead[0].close()


def _retrain(ctx, after: Manifest, plans: list, progress, meanwhile) -> tuple[dict, float]:
    """Run the plans, and ``meanwhile`` once while they train; ({shard: its stages' figures}, the wall
    time). ``meanwhile``'s phases overlap the retrain's wall time, they do not add to it."""
    stages: dict[int, list[dict]] = {}
    ran = []

    def once():
        ran.append(True)
        meanwhile()

    t = time.perf_counter()
    try:
        if plans:
            ctx.run_plans(OP, after, plans, _on_stage(progress, stages), once)
        else:
            once()
    except BaseException:
        if not ran:  # the retrain failed before it was sent: the shards are excluded all the same
            with contextlib.suppress(Exception):
                once()
        raise
    return stages, time.perf_counter() - t


def _training_phases(ph: Phases, wall: float, stages: dict) -> None:
    """Split the retrain's wall time: compute (Lightning's fit, the workers' ``seconds``), checkpoint and
    slice I/O in the workers (``io_seconds``), and the rest: scheduling, transfers, the driver's callbacks."""
    compute = sum(st["seconds"] for v in stages.values() for st in v)
    io = sum(st.get("io_seconds", 0.0) for v in stages.values() for st in v)
    ph.add("retrain_compute", compute)
    ph.add("checkpoint_io", io)
    ph.add("scheduling", max(0.0, wall - compute - io))


def _exclude(ctx, before: Manifest, rid: str, plan: dict, ph: Phases) -> None:
    """Commit the manifest that excludes the affected shards and says which request retrains them and for
    about how long (plan cost in sample-epochs times the last measured seconds per sample-epoch). The
    ledger keeps the request pending until it is effective: the manifest's ``retraining`` already says
    that it runs, so a ledger commit here would only repeat it."""
    starts = first_stages([tuple(sj) for sj in plan["slices"]])
    affected = sorted(starts)
    if affected:
        rows, eps = before.slice_rows(), before.schedules(ctx.config.epochs_per_stage())
        work = costmodel.plan_cost(rows, eps, starts)["sample_epochs"]
        rate = before.metrics.get("seconds_per_sample_epoch")
        if rate is None and before.metrics.get("fit_seconds"):
            rate = before.metrics["fit_seconds"] / max(1, costmodel.full_cost(rows, eps))
        excluded = before
        for s in affected:
            excluded = excluded.with_shard(s, excluded=True)
        info = Retraining(rid, tuple(affected), time.time(), work, work * rate if rate is not None else None)
        with ph("exclude"):
            ctx.commit(replace(excluded, retraining=info))


def _superseded(before: Manifest, after: Manifest, written: list[str], plans: list) -> list[str] | None:
    """The store files the swap left unreferenced: the superseded slices and checkpoints, and slices this
    request wrote that `append.squeeze` dropped. None when a stage was retried (a lost worker can leave a
    half-written file): the purge then lists the store."""
    if any(p.attempts for p in plans):
        return None
    keep = after.referenced_files()
    return sorted((before.referenced_files() | set(written)) - keep)


def _rewrite_slices(ctx, before: Manifest, affected: list[int], plan: dict, hashed: set, found: dict | None = None):
    """Write each affected slice again without the request's rows (new content-addressed files); returns the
    new manifest (not committed), the shard plans, rows removed per shard, each shard's first stage and the
    slice files written. A row goes when its id is one `locate` matched in that slice (``found``), or, for a
    resumed request, when its keyed hash is one the ledger holds."""
    store, key_hash, R = ctx.storage(), ctx.workdir.hash_ids, ctx.config.sharding.slices
    after = before
    plans, removed, starts, written = [], {}, {}, []
    for s in affected:
        sh = before.shards[s]
        slices = list(sh.slices)
        first = None
        removed[s] = 0
        for j in sorted(j for s2, j in plan["slices"] if s2 == s):
            rows = read_slice(store, slices[j].to_dict())
            present = rows["id"].tolist()
            if found is not None:
                drop = set(found.get((s, j), ())) & set(present)
            else:
                drop = {i for i, h in zip(present, key_hash(present)) if h in hashed}
            if not drop:
                continue
            removed[s] += len(drop)
            slices[j] = SliceRef.from_dict(write_slice(store, s, j, without(rows, drop, before.id_kind)))
            written.append(slices[j].file)
            first = j + 1 if first is None else min(first, j + 1)
        if first is None:  # nothing of this request left in the shard (a re-run after a crash)
            continue
        slices, epochs, first = append.squeeze(store, s, slices, sh.epochs, R, first)
        starts[s] = first
        prev = sh.checkpoints[first - 2].to_dict() if first > 1 else None
        plans.append(
            ShardPlan(shard=s, start_stage=first, slices=[e.to_dict() for e in slices], prev=prev, epochs=epochs)
        )
        after = after.with_shard(s, slices=tuple(slices), epochs=epochs)
    return after, plans, removed, starts, written


def _cost(ctx, after: Manifest, starts: dict[int, int], before: Manifest) -> dict:
    """The plan's exact cost on the partition after the deletion, each shard with its own schedule; with
    appended stages, the part of it they take (``appended_stages_sample_epochs``); under a deletion-aware
    placement, what one request was expected to cost beforehand under the rows' priors
    (``expected_sample_epochs``, compared with the realised cost by `sisa status`)."""
    rows, sched = after.slice_rows(), after.schedules(ctx.config.epochs_per_stage())
    cost = costmodel.plan_cost(rows, sched, starts)
    weights = before.slice_risk()
    if weights is not None:
        base = before.schedules(ctx.config.epochs_per_stage())
        cost["expected_sample_epochs"] = costmodel.expected_prior(before.slice_rows(), base, weights)
    if any(sh.epochs is not None for sh in after.shards):
        cost["appended_stages_sample_epochs"] = costmodel.appended_share(
            rows, sched, starts, ctx.config.sharding.slices
        )
    return cost


def _receipt(ctx, rid, hashed, plan, before: Manifest, plans, removed, cost, t0, already) -> Receipt:
    receipt = Receipt(
        request_id=rid,
        created=t0,
        finished=time.time(),
        hashed_ids=sorted(hashed),
        rows_deleted=sum(removed.values()),
        already_deleted=already,
        shards={p.shard: receipts.shard_entry(p, before, rows_removed=removed[p.shard]) for p in plans},
        config_hash=before.config_hash,
        cost=cost,
        wall_seconds=time.time() - t0,
        eval_rows_deleted=int(plan.get("eval_rows", 0)),
    )
    return replace(receipt, signature=receipts.sign_receipt(ctx.workdir, receipt.to_dict()))


def _on_stage(progress, stages: dict):
    """The crash point, the stage's figures kept for the run (with their end time), then ``progress``."""

    def cb(plan, entry, metrics):
        stages.setdefault(plan.shard, []).append({**metrics, "_end": time.time()})
        if progress:
            progress(plan, entry, metrics)

    return stage_callback(cb, "during_retrain")


def stage_callback(progress, point: str):
    """The per-stage callback of a retrain: the crash point ``point``, then the caller's ``progress``."""

    def cb(plan, entry, metrics):
        crashpoint(point)
        if progress:
            progress(plan, entry, metrics)

    return cb
