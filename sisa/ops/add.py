"""The add operation: `add(X, y, ids)` brings new rows into a trained ensemble without a refit.

Placement ``canonical`` (`sharding.new_rows`, the default): a new row goes to the shard, slice and rank its
id hashes to (`shards.partition`), exactly where `fit` would have put it, and each shard it lands in
retrains from its earliest affected stage. The ensemble then equals ``fit(live rows)`` bit for bit, whatever
the history of fits, additions and deletions, and an addition costs what deleting that many rows costs.

Placement ``append``: the batch forms one more slice (and stage) at the end of each shard it lands in
(`sisa.ops.append`); the ensemble equals the replay of its history without the deleted rows, and
`sisa.ops.compact` takes it back to ``fit(live rows)``.

Erased data stays erased: an id the ledger holds as deleted is refused (`check_erased`) unless the caller
readmits it explicitly (``readmit=[...]``), which the ledger records with the request.

Order of events (each step is safe to crash after; `recover` finishes the request on reopen):
  1. the batch is validated, then written to ``WORKDIR/additions/batch-<sha>.npy`` (atomic, fsynced), so
     the rows the acknowledgement promises exist on disk before it;
  2. the request is committed to the ledger (its plan names the batch file and its sha256; readmissions in
     the same transaction): the ack point. A crash before it leaves a batch file no request names, which the
     next recovery zeroes and removes: the ensemble is the old one, and the call never returned;
  3. the slices the rows land in are written again with them (new content-addressed files) and the shards
     retrained from their earliest affected stage into new checkpoints; the old ensemble keeps serving
     (it saw no deleted row, so nothing is excluded);
  4. the receipt is written, then the manifest switches to the new files (the atomic model swap);
  5. superseded files are purged, the new version is registered in MLflow, the batch file zeroed and
     removed, the request marked done. Recovery rolls forward: a request in the ledger is always finished.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from orchestration import ShardPlan
from shards.errors import DataError, WorkdirError
from shards.ids import canonical_ids, unique_request
from shards.partition import assign
from shards.schema import decode_rows, encode_rows, has_risk, make_rows
from shards.storage import sha256, zero_and_remove
from shards.store import read_slice, write_slice
from shards.validation import check_features, check_labels, check_unique, repeated_ids
from sisa import costmodel
from sisa import data as datamod
from sisa.failpoints import crashpoint
from sisa.ledger import RequestState
from sisa.manifest import Checkpoint, Manifest, SliceRef
from sisa.ops import append, compact, owed, purge, receipts
from sisa.ops import delete as deletion
from sisa.ops.base import refuse_base_ids
from sisa.ops.locate import first_stages, locate
from sisa.ops.receipts import AdditionPlan, Receipt
from sisa.risk import resolve as resolve_risk
from sisa.workdir import write_atomic

OP = "add"
BATCHES = "additions"  # WORKDIR/additions/: staged batches of acknowledged additions


# -- validation -----------------------------------------------------------------------------------------
def check_batch(ctx, m: Manifest, X, y, ids, readmit, risk=None):
    """The batch as (X float32, y int64, canonical ids, canonical readmit ids, priors or None), or a
    DataError; writes nothing. ``risk``: the rows' deletion priors (`sisa.risk`, deletion-aware placement)."""
    d = ctx.config.data
    if X is None or y is None or ids is None:
        raise DataError("add(X, y, ids=...) needs rows, labels and one id per row (ids name rows for delete)")
    X = datamod.select_features(X, m.feature_names, d.id_column, d.label_column)
    if len(X) == 0:
        raise DataError("add() got an empty batch; give at least one row")
    X = check_features(X, m.input_shape)
    y = check_labels(y, len(X))
    if int(y.max()) >= m.num_classes:
        row = int(np.flatnonzero(y >= m.num_classes)[0])
        raise DataError(
            f"labels go up to {int(y.max())} (first at row {row}) but the ensemble has {m.num_classes} classes "
            f"(labels 0..{m.num_classes - 1}); the output space is fixed at fit",
            rows=[row],
        )
    ids, _ = canonical_ids(ids, m.id_kind)
    if len(ids) != len(X):
        raise DataError(f"ids has {len(ids)} entries but there are {len(X)} rows; give one id per row")
    check_unique(repeated_ids(ids))
    risk = resolve_risk(ctx.config, risk, len(X))
    readmit = unique_request(readmit, m.id_kind) if readmit is not None and len(readmit) else []
    outside = set(readmit) - set(ids.tolist())
    if outside:
        raise DataError(f"readmit names {len(outside)} id(s) that are not in the batch; readmit only ids you add")
    return X, y, ids, readmit, risk


def _hash_list(hashes) -> str:
    hs = sorted(hashes)
    return ", ".join(h[:16] for h in hs[:5]) + (f" and {len(hs) - 5} more" if len(hs) > 5 else "")


def check_erased(ctx, ids, readmit=(), what: str = "add") -> list[str]:
    """Refuse ids the ledger holds as erased, unless readmitted; returns the hashed readmitted ids (each of
    which must be erased: a readmission of a live or unknown id is refused too)."""
    if not (ctx.workdir.path / "ledger.db").exists() or not len(ids):
        if len(readmit):
            raise DataError(f"readmit names {len(readmit)} id(s) this workdir never deleted; drop readmit")
        return []
    hashed = ctx.workdir.hash_ids(list(ids))
    erased = ctx.ledger().erased(hashed)
    again = set(ctx.workdir.hash_ids(list(readmit)))
    refused = erased - again
    if refused:
        raise DataError(
            f"{what}: {len(refused)} id(s) were erased from this ensemble (the ledger holds their keyed hashes: "
            f"{_hash_list(refused)}); erased data is never trained on again. Drop those rows, or pass "
            "readmit=[...] (--readmit) for ids whose owners consented again: the ledger records it",
            ids=sorted(refused)[:5],
        )
    stray = again - erased
    if stray:
        raise DataError(f"readmit names {len(stray)} id(s) that are not erased ({_hash_list(stray)}); drop them")
    return sorted(again)


def _check_new(ctx, m: Manifest, ids, readmit) -> list[str]:
    """Ids already training or held-out rows, or erased without readmit: a DataError, nothing written."""
    found, held, _, _ = locate(ctx, m, ids.tolist())
    n_train = sum(map(len, found.values()))
    if n_train or held:
        shown = sorted([i for g in found.values() for i in g] + sorted(held))[:5]
        raise DataError(
            f"{n_train + len(held)} id(s) are already in this ensemble ({n_train} training, {len(held)} held-out "
            f"rows), e.g. {shown}; ids are unique: give new ids, or delete the old rows first",
            ids=shown,
        )
    refuse_base_ids(ctx, m, ids.tolist())
    return check_erased(ctx, ids.tolist(), readmit)


# -- the plan -------------------------------------------------------------------------------------------
def _targets(ctx, ids, risk=None) -> dict[tuple[int, int], np.ndarray]:
    """{(shard, slice): row indices of the batch} where canonical placement puts each row (by its prior too,
    under a deletion-aware ``sharding.placement``: where `fit` puts it)."""
    c = ctx.config
    shard, sl, _ = assign(ids, c.seed, c.sharding.shards, c.sharding.slices, risk, c.placement())
    out: dict[tuple[int, int], np.ndarray] = {}
    for key in sorted(set(zip(shard.tolist(), sl.tolist()))):
        out[key] = np.flatnonzero((shard == key[0]) & (sl == key[1]))
    return out


def estimate(ctx, m: Manifest, X, y, ids, readmit=None, risk=None) -> AdditionPlan:
    """What `add` would do and cost, without changing anything (the same checks as `add`)."""
    X, y, ids, readmit, risk = check_batch(ctx, m, X, y, ids, readmit, risk)
    again = _check_new(ctx, m, ids, readmit)
    if ctx.config.sharding.new_rows == "append":
        return append.estimate(ctx, m, ids, ctx.config.appended_stage_epochs(), len(again))
    rows = [list(r) for r in m.slice_rows()]
    targets = _targets(ctx, ids, risk)
    for (s, j), idx in targets.items():
        rows[s][j] += len(idx)
    eps = m.schedules(ctx.config.epochs_per_stage())
    starts = first_stages(targets)
    cost = costmodel.plan_cost(rows, eps, starts)
    return AdditionPlan(
        placement="canonical",
        shards=dict(sorted(starts.items())),
        rows=len(ids),
        sample_epochs=cost["sample_epochs"],
        full_retrain_sample_epochs=cost["full_retrain_sample_epochs"],
        speedup=cost["speedup"],
        readmitted=len(again),
        expected_sample_epochs=costmodel.expected_addition(rows, eps, len(ids)),
    )


# -- the operation --------------------------------------------------------------------------------------
def add(ctx, m: Manifest, X, y, ids, readmit=None, progress=None, risk=None) -> Receipt:
    """Add rows (durably, then trained in); returns the signed receipt once the new ensemble serves."""
    t0 = time.time()
    X, y, ids, readmit, risk = check_batch(ctx, m, X, y, ids, readmit, risk)
    with ctx.workdir.lock(what="add"):
        recover(ctx, locked=True)
        m = ctx.read_manifest()
        again = _check_new(ctx, m, ids, readmit)
        if m.encoder is not None:  # the slices hold the frozen encoder's features (shards.encoder)
            from shards import encoder

            X = encoder.encode_finite(ctx.encoder(m), X, "new rows")  # before anything is staged
        batch = _stage(ctx, encode_rows(make_rows(ids, y, X, m.id_kind, risk)), len(ids))  # priors stored too
        plan = {"kind": OP, "placement": ctx.config.sharding.new_rows, "batch": batch, "readmitted": again}
        if plan["placement"] == "append":
            plan["epochs"] = ctx.config.appended_stage_epochs()  # fixed at the ack: recovery trains the same
            plan["slices"] = [[s, len(m.shards[s].slices)] for s in append.targets(ctx, ids)]
        else:
            plan["slices"] = sorted([s, j] for s, j in _targets(ctx, ids, risk))
        crashpoint("add_before_ledger")
        rid = ctx.ledger().record([], plan, again)  # the ack point: from here on the addition is never lost
        crashpoint("add_after_ledger")
        return _execute(ctx, m, rid, plan, t0, progress)


def _stage(ctx, data: bytes, n: int) -> dict:
    digest = sha256(data)
    rel = f"{BATCHES}/batch-{digest[:16]}.npy"
    write_atomic(ctx.workdir.path / rel, data)
    return {"file": rel, "sha256": digest, "rows": n}


def _read_batch(ctx, batch: dict) -> np.ndarray:
    path = ctx.workdir.path / batch["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WorkdirError(f"{path} (the rows of an acknowledged addition) is missing", path=str(path)) from None
    if sha256(data) != batch["sha256"]:
        raise WorkdirError(f"{path} does not match the sha256 the ledger recorded for it", path=str(path))
    return decode_rows(data)


def _merge(ctx, before: Manifest, batch: np.ndarray):
    """Each slice the batch lands in, written again with its new rows in canonical (rank) order; returns
    the new manifest (not committed), the shard plans, each shard's first stage and rows added per shard."""
    c, store, kind = ctx.config, ctx.storage(), before.id_kind
    after, starts, added = before, {}, {}
    risk = batch["risk"] if has_risk(batch) else None
    for (s, j), idx in _targets(ctx, batch["id"], risk).items():
        old = read_slice(store, after.shards[s].slices[j].to_dict())
        ids = np.concatenate([old["id"], batch["id"][idx]])
        r = np.concatenate([old["risk"], risk[idx]]) if risk is not None else None
        rows = make_rows(
            ids, np.concatenate([old["y"], batch["y"][idx]]), np.concatenate([old["x"], batch["x"][idx]]), kind, r
        )
        rows = rows[np.argsort(assign(rows["id"], c.seed, c.sharding.shards, c.sharding.slices)[2], kind="stable")]
        slices = list(after.shards[s].slices)
        slices[j] = SliceRef.from_dict(write_slice(store, s, j, rows))
        after = after.with_shard(s, slices=tuple(slices))
        starts[s] = min(starts.get(s, j + 1), j + 1)
        added[s] = added.get(s, 0) + len(idx)
    plans = []
    for s, r in sorted(starts.items()):
        prev = before.shards[s].checkpoints[r - 2].to_dict() if r > 1 else None
        sh = after.shards[s]
        plans.append(
            ShardPlan(shard=s, start_stage=r, slices=[e.to_dict() for e in sh.slices], prev=prev, epochs=sh.epochs)
        )
    return after, plans, starts, added


def _prepare(ctx, before: Manifest, plan: dict, batch: np.ndarray):
    """The new slices written, the shard plans, each shard's first stage, rows added per shard, and the
    plan's exact cost with its analytic expectation (`sisa.costmodel`)."""
    base = ctx.config.epochs_per_stage()
    if plan.get("placement", "canonical") == "append":
        after, plans, starts, added = append.merge(ctx, before, batch, int(plan["epochs"]))
        rows, sched = after.slice_rows(), after.schedules(base)
        cost = append.cost(ctx, before.slice_rows(), rows, sched, sorted(starts), len(batch), int(plan["epochs"]))
        return after, plans, starts, added, cost
    after, plans, starts, added = _merge(ctx, before, batch)
    rows, sched = after.slice_rows(), after.schedules(base)
    cost = costmodel.plan_cost(rows, sched, starts)
    cost["expected_sample_epochs"] = costmodel.expected_addition(rows, sched, len(batch))
    return after, plans, starts, added, cost


def _execute(ctx, before: Manifest, rid: str, plan: dict, t0: float, progress) -> Receipt:
    ctx.ledger().set_state(rid, RequestState.RETRAINING)
    batch = _read_batch(ctx, plan["batch"])
    after, plans, starts, added, cost = _prepare(ctx, before, plan, batch)
    ctx.observer.started(OP, after, {"sisa.request_id": rid})
    try:
        t_train = time.time()
        ctx.run_plans(OP, after, plans, deletion.stage_callback(progress, "add_during_retrain"))
        rate = (time.time() - t_train) / cost["sample_epochs"] if cost["sample_epochs"] else None
        for p in plans:
            done = before.shards[p.shard].checkpoints[: p.start_stage - 1]
            after = after.with_shard(p.shard, checkpoints=done + tuple(Checkpoint.from_dict(e) for e in p.checkpoints))
        after = replace(after, applied_requests=(*before.applied_requests, rid))
        receipt = _receipt(ctx, rid, plan, before, plans, added, cost, t0)
        receipts.write(ctx.workdir, receipt)
        crashpoint("add_before_swap")
        ctx.commit(after)  # the atomic swap
        crashpoint("add_after_swap")
        metrics = ctx.evaluate(after)
        after = after.with_metrics(**metrics, **({"seconds_per_sample_epoch": rate} if rate is not None else {}))
        ctx.commit(after)
        _tell(ctx, before, after, receipt, plans, cost, metrics)
    except BaseException as e:
        ctx.observer.failed(OP, e)
        raise
    _finish(ctx, after, rid, plan, receipt, ctx.observer.run_id)
    return receipt


def _receipt(ctx, rid: str, plan: dict, before: Manifest, plans, added: dict, cost: dict, t0: float) -> Receipt:
    receipt = Receipt(
        request_id=rid,
        created=t0,
        finished=time.time(),
        hashed_ids=[],  # an addition deletes nothing; the ledger holds no ids for it
        rows_deleted=0,
        already_deleted=0,
        shards={p.shard: receipts.shard_entry(p, before, rows_added=added[p.shard]) for p in plans},
        config_hash=before.config_hash,
        cost=cost,
        wall_seconds=time.time() - t0,
        kind=OP,
        rows_added=int(plan["batch"]["rows"]),
        readmitted=list(plan.get("readmitted", [])),
        placement=plan.get("placement", "canonical"),
    )
    return replace(receipt, signature=receipts.sign_receipt(ctx.workdir, receipt.to_dict()))


def _tell(ctx, before: Manifest, after: Manifest, receipt: Receipt, plans, cost: dict, metrics: dict) -> None:
    """The observer's summary of the addition (counts and hashes only, never raw ids or rows)."""
    ctx.observer.finished(
        OP,
        after,
        plans,
        {
            **metrics,
            "ensemble_accuracy_before": before.metrics.get("ensemble_accuracy"),
            "shard_accuracy_before": before.metrics.get("shard_accuracy"),
            "rows_added": receipt.rows_added,
            "rows_readmitted": len(receipt.readmitted),
            "shards_retrained": len(plans),
            **{k: v for k, v in cost.items() if v != float("inf")},
        },
        {"sisa.rows_added": receipt.rows_added, "sisa.rows_readmitted": len(receipt.readmitted)},
        None,
    )


def _finish(ctx, m: Manifest, rid: str, plan: dict, receipt, run_id) -> None:
    """Purge superseded files, register the new version, drop the staged batch, mark the request done.

    The new MLflow version purges the older ones (``purge=True``): they saw no deleted row, but the audit
    holds that only ``@current`` survives, and the next deletion would purge them anyway."""
    purge.unreferenced(ctx, m)
    ctx.workdir.remove_stale_copies()
    ctx.drop_caches()
    ctx.publish(m, purge=True, request_id=rid, run_id=run_id)
    zero_and_remove(ctx.workdir.path / plan["batch"]["file"])
    if receipt is None and receipts.path(ctx.workdir, rid).exists():
        receipt = receipts.load(ctx.workdir, rid)
    ctx.ledger().set_state(rid, RequestState.DONE, receipt.to_dict() if receipt else None)


# -- recovery: every unfinished request of the ledger, additions and deletions, in ledger order ----------
def recover(ctx, locked: bool = False, wait: bool = True, settle: bool = True) -> list[str]:
    """Finish every unfinished request (`sisa.ops.delete.resume` for deletions, `resume` for additions,
    `sisa.ops.compact.resume` for compactions) and
    drop staged batches no request names (an addition killed before its ledger commit). Returns their ids."""
    if not (ctx.workdir.path / "ledger.db").exists():
        return []
    todo = ctx.ledger().unfinished()
    if not settle:  # effective deletions keep their owed bookkeeping for a later batch
        todo = [r for r in todo if r["state"] != RequestState.EFFECTIVE]
    stray = _stray_batches(ctx, todo)
    runs_owed = settle and bool(owed.pending(ctx.workdir))  # done deletions whose run is not logged yet
    if not todo and not stray and not runs_owed:
        return []
    if not locked:
        if not wait and ctx.workdir.busy():
            return []
        with ctx.workdir.lock(what="recovery"):
            return recover(ctx, locked=True, settle=settle)
    for req in todo:
        kind = req["plan"].get("kind")
        if kind in (OP, compact.OP):
            (resume if kind == OP else compact.resume)(ctx, req)
        else:
            deletion.resume(ctx, req, "done" if settle else "effective")
    for p in _stray_batches(ctx, []):
        zero_and_remove(p)
    if settle and owed.pending(ctx.workdir):
        purge.settle(ctx)
    return [r["id"] for r in todo]


def _stray_batches(ctx, todo: list[dict]) -> list:
    named = {r["plan"]["batch"]["file"] for r in todo if r["plan"].get("kind") == OP}
    d = ctx.workdir.path / BATCHES
    return [p for p in sorted(d.glob("batch-*.npy")) if f"{BATCHES}/{p.name}" not in named] if d.is_dir() else []


def resume(ctx, req: dict) -> None:
    """Finish one acknowledged addition: after the swap, evaluate and finish; before it, start again from
    the committed manifest (the batch merges into the same slices: idempotent)."""
    rid, plan = req["id"], req["plan"]
    m = ctx.read_manifest()
    if rid in m.applied_requests:
        m = m.with_metrics(**ctx.evaluate(m))
        ctx.commit(m)
        _finish(ctx, m, rid, plan, None, None)
    else:
        ctx.workdir.remove_temp_files()
        purge.unreferenced(ctx, m)  # half-written files of the crashed attempt
        _execute(ctx, m, rid, plan, time.time(), None)


def admit_refit(ctx, ids, readmit, kind: str) -> int:
    """`fit` on a workdir with a ledger: refuse erased ids among the new data unless readmitted, and record
    the readmissions (durably, before anything trains on them). Returns how many were readmitted."""
    readmit = unique_request(readmit, kind) if readmit is not None and len(readmit) else []
    again = check_erased(ctx, list(ids), readmit, what="fit")
    if again:
        ctx.ledger().readmit(again, request="fit-" + time.strftime("%Y%m%dT%H%M%S"))
    return len(again)


def slice_ids(store, slices: list[list[dict]]) -> list:
    """Every id of freshly written slice files (a Parquet refit's, checked by `admit_refit`)."""
    return [i for sl in slices for e in sl for i in read_slice(store, e)["id"].tolist()]
