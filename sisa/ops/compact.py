"""The compact operation: refit the live rows into the canonical layout, exact to ``fit(live rows)``.

Append placement (`sisa.ops.append`) leaves appended slices and stages at the end of the shards; each makes
every later deletion dearer (`costmodel.deletion_overhead`). `compact` folds them back: every live row goes
to the shard, slice and rank its id hashes to (`shards.partition`, what `fit` does), and every shard is
trained from scratch. The result equals ``fit(live rows)`` bit for bit (held-out rows unchanged), at the
cost of a full fit (`estimate`). An ensemble without appended slices is already canonical: nothing to do.

Order of events (each step is safe to crash after; `sisa.ops.add.recover` finishes the request on reopen):
  1. the request is committed to the ledger: the ack point (from here on it is never lost);
  2. the canonical slices are written (new content-addressed files) and every shard trained from stage 1;
     the old ensemble keeps serving meanwhile (it saw no deleted row);
  3. the receipt is written, then the manifest switches to the new files (the atomic model swap);
  4. the superseded slices and checkpoints are purged, the new version registered in MLflow (the older
     ones purged), the request marked done. Before the swap, recovery starts again from the committed
     (old) manifest; after it, recovery finishes steps 4.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from orchestration import ShardPlan
from shards.store import read_slice, write_partition
from sisa import costmodel
from sisa.failpoints import crashpoint
from sisa.ledger import RequestState
from sisa.manifest import Checkpoint, Manifest, ShardState, SliceRef
from sisa.ops import purge, receipts
from sisa.ops.delete import stage_callback
from sisa.ops.receipts import CompactionPlan, Receipt

OP = "compact"


def _appended(ctx, m: Manifest) -> int:
    return sum(max(0, len(sh.slices) - ctx.config.sharding.slices) for sh in m.shards)


def _live_rows(ctx, m: Manifest) -> np.ndarray | None:
    """Every live training row (all slices of all shards), or None when there is none."""
    store = ctx.storage()
    parts = [read_slice(store, e.to_dict()) for sh in m.shards for e in sh.slices if e.rows]
    return np.concatenate(parts) if parts else None


def _canonical_rows(ctx, m: Manifest) -> list[list[int]]:
    """The slice sizes of the canonical layout of ``m``'s live rows (reads the appended slices' ids only)."""
    from shards.partition import assign

    c, store = ctx.config, ctx.storage()
    R = c.sharding.slices
    rows = [[e.rows for e in sh.slices[:R]] for sh in m.shards]
    for sh in m.shards:
        for e in sh.slices[R:]:
            if e.rows:
                s, j, _ = assign(read_slice(store, e.to_dict())["id"], c.seed, c.sharding.shards, R)
                for a, b in zip(s.tolist(), j.tolist()):
                    rows[a][b] += 1
    return rows


def estimate(ctx, m: Manifest) -> CompactionPlan:
    """What `compact` would do and cost, without changing anything."""
    base = ctx.config.epochs_per_stage()
    rows, sched = m.slice_rows(), m.schedules(base)
    after = _canonical_rows(ctx, m) if _appended(ctx, m) else rows
    return CompactionPlan(
        rows=sum(map(sum, rows)),
        shards=len(rows),
        appended_slices=_appended(ctx, m),
        sample_epochs=costmodel.full_cost(after, base) if _appended(ctx, m) else 0,
        deletion_overhead_sample_epochs=costmodel.deletion_overhead(rows, sched, ctx.config.sharding.slices),
        expected_deletion_sample_epochs_before=costmodel.expected_single(rows, sched),
        expected_deletion_sample_epochs_after=costmodel.expected_single(after, base),
    )


def compact(ctx, m: Manifest, progress=None) -> Receipt:
    """Refit into the canonical layout (durably requested, crash-safe); returns the signed receipt, or an
    empty one (``request_id`` None) when the ensemble has no appended slice. The caller finishes the ledger's
    unfinished requests first (`sisa.ops.add.recover`, as `SisaEnsemble.compact` does)."""
    t0 = time.time()
    with ctx.workdir.lock(what="compact"):
        m = ctx.read_manifest()
        if not _appended(ctx, m):
            return Receipt(None, t0, time.time(), [], 0, 0, config_hash=m.config_hash, kind=OP)
        plan = {"kind": OP, "appended_slices": _appended(ctx, m)}
        crashpoint("compact_before_ledger")
        rid = ctx.ledger().record([], plan)  # the ack point: from here on the compaction is never lost
        crashpoint("compact_after_ledger")
        return _execute(ctx, m, rid, t0, progress)


def resume(ctx, req: dict) -> None:
    """Finish one acknowledged compaction: after the swap, evaluate and purge; before it, start again."""
    rid = req["id"]
    m = ctx.read_manifest()
    if rid in m.applied_requests:
        m = m.with_metrics(**ctx.evaluate(m))
        ctx.commit(m)
        purge.finish(ctx, m, rid, None, None)
    else:
        ctx.workdir.remove_temp_files()
        purge.unreferenced(ctx, m)  # half-written files of the crashed attempt
        _execute(ctx, m, rid, time.time(), None)


def _layout(ctx, before: Manifest) -> tuple[Manifest, list[ShardPlan]]:
    """The canonical slices of the live rows written (as `fit` writes them); every shard from stage 1."""
    c, store = ctx.config, ctx.storage()
    live = _live_rows(ctx, before)
    empty = np.zeros(0, dtype=[("id", "i8"), ("y", "i8"), ("x", "f4", tuple(before.input_shape))])
    live = empty if live is None else live
    slices = write_partition(
        store, live["id"], live["x"], live["y"], before.id_kind, c.seed, c.sharding.shards, c.sharding.slices
    )
    shards = tuple(ShardState(slices=tuple(SliceRef.from_dict(e) for e in sl)) for sl in slices)
    after = replace(before, shards=shards, retraining=None)
    plans = [ShardPlan(shard=s, start_stage=1, slices=[e.to_dict() for e in sh.slices]) for s, sh in enumerate(shards)]
    return after, plans


def _execute(ctx, before: Manifest, rid: str, t0: float, progress) -> Receipt:
    ctx.ledger().set_state(rid, RequestState.RETRAINING)
    after, plans = _layout(ctx, before)
    base = ctx.config.epochs_per_stage()
    cost = costmodel.plan_cost(after.slice_rows(), base, {p.shard: 1 for p in plans})
    cost["expected_sample_epochs"] = cost["sample_epochs"]  # a refit: the exact figure is the expectation
    cost["deletion_overhead_sample_epochs_before"] = costmodel.deletion_overhead(
        before.slice_rows(), before.schedules(base), ctx.config.sharding.slices
    )
    ctx.observer.started(OP, after, {"sisa.request_id": rid})
    try:
        t_train = time.time()
        ctx.run_plans(OP, after, plans, stage_callback(progress, "compact_during_retrain"))
        rate = (time.time() - t_train) / cost["sample_epochs"] if cost["sample_epochs"] else None
        for p in plans:
            after = after.with_shard(p.shard, checkpoints=tuple(Checkpoint.from_dict(e) for e in p.checkpoints))
        after = replace(after, applied_requests=(*before.applied_requests, rid))
        receipt = _receipt(ctx, rid, before, plans, cost, t0)
        receipts.write(ctx.workdir, receipt)
        crashpoint("compact_before_swap")
        ctx.commit(after)  # the atomic swap
        crashpoint("compact_after_swap")
        metrics = ctx.evaluate(after)
        after = after.with_metrics(**metrics, **({"seconds_per_sample_epoch": rate} if rate is not None else {}))
        ctx.commit(after)
        ctx.observer.finished(
            OP, after, plans, {**metrics, **cost, "shards_retrained": len(plans)}, {"sisa.compaction": "1"}, None
        )
    except BaseException as e:
        ctx.observer.failed(OP, e)
        raise
    purge.finish(ctx, after, rid, receipt, ctx.observer.run_id)  # superseded files, older MLflow versions
    return receipt


def _receipt(ctx, rid: str, before: Manifest, plans, cost: dict, t0: float) -> Receipt:
    receipt = Receipt(
        request_id=rid,
        created=t0,
        finished=time.time(),
        hashed_ids=[],  # a compaction deletes nothing and adds nothing
        rows_deleted=0,
        already_deleted=0,
        shards={p.shard: receipts.shard_entry(p, before) for p in plans},  # every shard from stage 1
        config_hash=before.config_hash,
        cost=cost,
        wall_seconds=time.time() - t0,
        kind=OP,
    )
    return replace(receipt, signature=receipts.sign_receipt(ctx.workdir, receipt.to_dict()))
