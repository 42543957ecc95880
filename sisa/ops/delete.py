"""Exact deletion: `delete(ids)` retrains only the shards that held the ids, each from the checkpoint
taken before its earliest affected slice, and leaves no byte of the deleted rows behind.

Held-out evaluation rows (``eval.npy``, see `sisa.evalfile`) are erased too: they need no retraining, only
a rewrite of the evaluation file, so a request may hold training rows, evaluation rows or both.

Order of events (each step is safe to crash after; `recover` finishes the request on reopen):
  1. the request is committed to the ledger (hashed ids + which slices they sit in): the ack point;
  2. the affected shards are excluded from prediction (manifest commit, naming the request and its
     expected duration for predictors that wait, see `SisaEnsemble.aggregator`);
  3. the evaluation file is rewritten without the request's rows (atomic, idempotent);
  4. the slices are rewritten without the rows and the shards retrained, into new files;
  5. the receipt is written, then the manifest switches to the new files (the atomic model swap);
  6. superseded slices and checkpoints are purged, worker caches and stale copies dropped, the request
     marked done.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace

from orchestration import ShardPlan
from shards.errors import DataError, RetrainingError, UnknownIdsError, WorkdirError
from shards.ids import unique_request
from shards.store import read_slice, without, write_slice
from sisa import costmodel, evalfile
from sisa.failpoints import crashpoint
from sisa.ledger import Ledger
from sisa.workdir import purge_unreferenced, write_atomic


@dataclass(frozen=True)
class DeletionPlan:
    shards: dict[int, int]  # shard -> first stage to retrain (1-based)
    rows: int
    already_deleted: int
    sample_epochs: int
    full_retrain_sample_epochs: int
    speedup: float
    eval_rows: int = 0  # held-out evaluation rows among the ids (erased without retraining)


@dataclass(frozen=True)
class Receipt:
    request_id: str | None
    created: float
    finished: float
    hashed_ids: list[str]
    rows_deleted: int
    already_deleted: int
    shards: dict = field(default_factory=dict)  # shard -> {from_stage, rows_removed, checkpoint digests ...}
    config_hash: str = ""
    cost: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    eval_rows_deleted: int = 0  # held-out evaluation rows erased from eval.npy
    signature: str = ""  # HMAC of every other field with a key derived from the workdir secret (sisa.audit.certificate)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Receipt:
        d = dict(d)
        d["shards"] = {int(k): v for k, v in d.get("shards", {}).items()}
        return cls(**d)


def _ledger(ens) -> Ledger:
    return Ledger(ens.workdir.path / "ledger.db")


def _normalise(ens, ids) -> list:
    """The request's ids, canonical (see `shards.ids`): a scalar is one id, the ensemble's kind only."""
    try:
        return unique_request(ids, ens.manifest["id_kind"])
    except DataError as e:
        if "no ids given" in e.message:
            raise DataError("delete() needs at least one id; got an empty list", ids=[]) from None
        raise


def locate(ens, ids: list) -> tuple[dict, set, list, list]:
    """Split ids into training rows found {(shard, slice): set(ids)}, evaluation rows, already deleted,
    and unknown."""
    m, store = ens.manifest, ens.storage()
    by_slice: dict[tuple[int, int], list] = {}
    for i in ids:
        by_slice.setdefault(ens.shard_of(i), []).append(i)
    found: dict[tuple[int, int], set] = {}
    missing = []
    for (s, j), group in by_slice.items():
        present = set(read_slice(store, m["shards"][s]["slices"][j])["id"].tolist())
        hit = {i for i in group if i in present}
        if hit:
            found[(s, j)] = hit
        missing += [i for i in group if i not in present]
    held = evalfile.find(ens.workdir.path, missing)
    missing = [i for i in missing if i not in held]
    gone = set()
    if missing:
        hashes = ens.workdir.hash_ids(missing)
        known = _ledger(ens).deleted(hashes)
        gone = {i for i, h in zip(missing, hashes) if h in known}
    return found, held, [i for i in missing if i in gone], [i for i in missing if i not in gone]


def _first_stages(found) -> dict[int, int]:
    out: dict[int, int] = {}
    for s, j in found:
        out[s] = min(out.get(s, j + 1), j + 1)
    return out


def _check_resume_points(ens, starts: dict[int, int]) -> None:
    """Refuse before the ledger commit if a file the retrain needs (the checkpoint it resumes from, the
    shard's slices) is damaged, so that a doomed request is never acknowledged."""
    store = ens.storage()
    for s, r in starts.items():
        sh = ens.manifest["shards"][s]
        if r > 1:
            c = sh["checkpoints"][r - 2]
            store.read(c["file"], c["sha256"])
        for e in sh["slices"]:
            store.read(e["file"], e["sha256"])


def estimate(ens, ids) -> DeletionPlan:
    ids = _normalise(ens, ids)
    found, held, gone, unknown = locate(ens, ids)
    if unknown:
        raise _unknown(ens, unknown)
    starts = _first_stages(found)
    rows = [[e["rows"] for e in sh["slices"]] for sh in ens.manifest["shards"]]
    cost = costmodel.plan_cost(rows, ens.config.epochs_per_stage(), starts)
    return DeletionPlan(
        shards=dict(sorted(starts.items())),
        rows=sum(map(len, found.values())),
        already_deleted=len(gone),
        sample_epochs=cost["sample_epochs"],
        full_retrain_sample_epochs=cost["full_retrain_sample_epochs"],
        speedup=cost["speedup"],
        eval_rows=len(held),
    )


def _unknown(ens, unknown) -> UnknownIdsError:
    shown = ", ".join(repr(i) for i in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    rows = evalfile.read(ens.workdir.path)
    unnamed = (
        f" ({len(rows)} evaluation rows of this workdir were stored without ids and cannot be named)"
        if rows is not None and len(rows) and not evalfile.has_ids(rows)
        else ""
    )
    return UnknownIdsError(
        f"{len(unknown)} id(s) are neither training nor evaluation rows of this ensemble and were never deleted "
        f"from it: {shown}{unnamed}. Nothing was changed; check the ids (and their type) and call delete() again",
        ids=unknown[:5],
    )


def delete(ens, ids, progress=None) -> Receipt:
    t0 = time.time()
    ids = _normalise(ens, ids)
    with ens.workdir.lock(what="delete"):
        ens._manifest = ens.workdir.read_manifest()
        recover(ens, locked=True)
        found, held, gone, unknown = locate(ens, ids)
        if unknown:
            raise _unknown(ens, unknown)
        if not found and not held:
            return Receipt(None, t0, time.time(), [], 0, len(gone), config_hash=ens.manifest["config_hash"])
        _check_resume_points(ens, _first_stages(found))
        hashed = ens.workdir.hash_ids([i for g in found.values() for i in g] + sorted(held))
        plan = {"slices": sorted([s, j] for s, j in found), "eval_rows": len(held)}
        crashpoint("before_ledger")
        rid = _ledger(ens).record(hashed, plan)  # the ack point: from here on the deletion is never lost
        crashpoint("after_ledger")
        return _execute(ens, rid, set(hashed), plan, t0, len(gone), progress)


def recover(ens, locked: bool = False, wait: bool = True) -> list[str]:
    """Finish every request the ledger holds that is not done. Returns their ids.

    ``wait=False`` (`SisaEnsemble.open`): if another process holds the workdir, it is running the request
    (a crashed one holds no lock), so leave it to that process instead of blocking until it is done."""
    ledger = _ledger(ens) if (ens.workdir.path / "ledger.db").exists() else None
    if ledger is None:
        return []
    todo = ledger.unfinished()
    if not todo:
        return []
    if not locked:
        if not wait and ens.workdir.busy():
            return []
        with ens.workdir.lock(what="recovery"):
            ens._manifest = ens.workdir.read_manifest()
            return recover(ens, locked=True)
    for req in todo:
        rid = req["id"]
        ens._manifest = ens.workdir.read_manifest()
        if rid in ens.manifest.get("applied_requests", []):
            m = copy.deepcopy(ens.manifest)
            m["metrics"] = {**m.get("metrics", {}), **ens.evaluate(m)}
            ens.commit(m)
            _finish(ens, rid, None)
        else:
            ens.workdir.remove_temp_files()
            purge_unreferenced(ens.storage(), ens.manifest)  # half-written files of the crashed attempt
            _execute(ens, rid, set(ledger.hashed_ids(rid)), req["plan"], time.time(), 0, None)
    return [r["id"] for r in todo]


def _execute(ens, rid: str, hashed: set, plan: dict, t0: float, already: int, progress) -> Receipt:
    before = ens.manifest
    affected = sorted({s for s, _ in plan["slices"]})
    _exclude(ens, rid, before, plan)  # no prediction from a shard that saw the rows, from here on
    crashpoint("before_eval_rewrite")
    evalfile.erase(ens.workdir, hashed, before["id_kind"])  # idempotent: a re-run after a crash finds nothing
    crashpoint("after_eval_rewrite")
    after, plans, removed, starts = _rewrite_slices(ens, before, affected, plan, hashed)
    sizes = [[e["rows"] for e in sh["slices"]] for sh in after["shards"]]
    cost = costmodel.plan_cost(sizes, ens.config.epochs_per_stage(), starts)
    with ens.tracker().operation("delete", after, tags={"sisa.request_id": rid}) as run:
        t_train = time.time()
        if plans:
            ens.run_plans(after, plans, _on_stage(run, progress))
        rate = (time.time() - t_train) / cost["sample_epochs"] if cost["sample_epochs"] else None
        for p in plans:
            old = before["shards"][p.shard]["checkpoints"]
            after["shards"][p.shard]["checkpoints"] = old[: p.start_stage - 1] + p.checkpoints
        for s in affected:
            after["shards"][s]["excluded"] = False
        after.pop("retraining", None)
        after["applied_requests"] = before.get("applied_requests", []) + [rid]
        receipt = _receipt(ens, rid, hashed, plan, before, plans, removed, cost, t0, already)
        write_atomic(ens.workdir.path / "receipts" / f"{rid}.json", json.dumps(receipt.to_dict(), indent=1).encode())
        crashpoint("before_swap")
        ens.commit(after)  # the atomic swap
        crashpoint("after_swap")
        _after_swap(ens, rid, receipt, before, after, run, plans, cost, plan, rate)
    return receipt


def _exclude(ens, rid: str, before: dict, plan: dict) -> None:
    """Commit the manifest that excludes the affected shards and says which request retrains them and for
    about how long (plan cost in sample-epochs times the last measured seconds per sample-epoch)."""
    starts = _first_stages([tuple(sj) for sj in plan["slices"]])
    affected = sorted(starts)
    excluded = copy.deepcopy(before)
    for s in affected:
        excluded["shards"][s]["excluded"] = True
    if affected:
        rows = [[e["rows"] for e in sh["slices"]] for sh in before["shards"]]
        eps = ens.config.epochs_per_stage()
        work = costmodel.plan_cost(rows, eps, starts)["sample_epochs"]
        m = before.get("metrics", {})
        rate = m.get("seconds_per_sample_epoch")
        if rate is None and m.get("fit_seconds"):
            rate = m["fit_seconds"] / max(1, costmodel.full_cost(rows, eps))
        excluded["retraining"] = {
            "request_id": rid,
            "shards": affected,
            "started": time.time(),
            "sample_epochs": work,
            "expected_seconds": work * rate if rate is not None else None,
        }
        ens.commit(excluded)
    _ledger(ens).set_state(rid, "retraining")


def _rewrite_slices(ens, before: dict, affected: list[int], plan: dict, hashed: set):
    """Write each affected slice again without the request's rows (new content-addressed files); returns the
    new manifest (not committed), the shard plans, rows removed per shard and each shard's first stage."""
    store, key_hash = ens.storage(), ens.workdir.hash_ids
    after = copy.deepcopy(before)
    plans, removed, starts = [], {}, {}
    for s in affected:
        sh = after["shards"][s]
        slices = list(sh["slices"])
        first = None
        removed[s] = 0
        for j in sorted(j for s2, j in plan["slices"] if s2 == s):
            rows = read_slice(store, slices[j])
            drop = {i for i, h in zip(rows["id"].tolist(), key_hash(rows["id"].tolist())) if h in hashed}
            if not drop:
                continue
            removed[s] += len(drop)
            slices[j] = write_slice(store, s, j, without(rows, drop, before["id_kind"]))
            first = j + 1 if first is None else min(first, j + 1)
        if first is None:  # nothing of this request left in the shard (a re-run after a crash)
            continue
        starts[s] = first
        prev = sh["checkpoints"][first - 2] if first > 1 else None
        plans.append(ShardPlan(shard=s, start_stage=first, slices=slices, prev=prev))
        sh["slices"] = slices
    return after, plans, removed, starts


def _receipt(ens, rid, hashed, plan, before, plans, removed, cost, t0, already) -> Receipt:
    receipt = Receipt(
        request_id=rid,
        created=t0,
        finished=time.time(),
        hashed_ids=sorted(hashed),
        rows_deleted=sum(removed.values()),
        already_deleted=already,
        shards={
            p.shard: {
                "from_stage": p.start_stage,
                "rows_removed": removed[p.shard],
                "resumed_from": p.prev["sha256"] if p.prev else None,
                "checkpoints_before": [
                    c["sha256"] for c in before["shards"][p.shard]["checkpoints"][p.start_stage - 1 :]
                ],
                "checkpoints_after": [c["sha256"] for c in p.checkpoints],
                "lineage_after": p.checkpoints[-1]["lineage"] if p.checkpoints else None,
            }
            for p in plans
        },
        config_hash=before["config_hash"],
        cost=cost,
        wall_seconds=time.time() - t0,
        eval_rows_deleted=int(plan.get("eval_rows", 0)),
    )
    from sisa.audit.certificate import sign_receipt

    return replace(receipt, signature=sign_receipt(ens.workdir, receipt.to_dict()))


def _after_swap(ens, rid, receipt, before, after, run, plans, cost, plan, rate) -> None:
    """Re-evaluate on the (rewritten) evaluation file, purge, mark the request done, log the run."""
    acc_before = before.get("metrics", {}).get("ensemble_accuracy")
    metrics = ens.evaluate(after)
    after["metrics"] = {**before.get("metrics", {}), **metrics}
    if rate is not None:
        after["metrics"]["seconds_per_sample_epoch"] = rate
    ens.commit(after)
    _finish(ens, rid, receipt, run)
    run.finish(
        ens,
        plans,
        {
            **metrics,
            "ensemble_accuracy_before": acc_before,
            "shard_accuracy_before": before.get("metrics", {}).get("shard_accuracy"),
            "rows_deleted": receipt.rows_deleted,
            "eval_rows_deleted": receipt.eval_rows_deleted,
            "shards_retrained": len(plans),
            **{k: v for k, v in cost.items() if v != float("inf")},
        },
        extra_tags={"sisa.rows_deleted": receipt.rows_deleted},
        slices_hit=plan["slices"],
    )


def _on_stage(run, progress):
    def cb(plan, entry, metrics):
        crashpoint("during_retrain")
        run.stage(plan.shard, metrics)
        if progress:
            progress(plan, entry, metrics)

    return cb


def _finish(ens, rid: str, receipt: Receipt | None, run=None) -> None:
    """Purge what the swap superseded and mark the request done."""
    purge_unreferenced(ens.storage(), ens.manifest, on_delete=lambda: crashpoint("during_purge"))
    ens.workdir.remove_stale_copies()  # temp files, a killed fit's spill and evaluation file
    ens.executor.drop_caches() if ens._executor is not None else None
    # MLflow: register the new ensemble version, delete every model version and artifact that saw the rows
    ens.tracker().publish(ens, getattr(run, "run_id", None), purge=True, request_id=rid)
    if receipt is None:
        p = ens.workdir.path / "receipts" / f"{rid}.json"
        receipt = Receipt.from_dict(json.loads(p.read_text())) if p.exists() else None
    _ledger(ens).set_state(rid, "done", receipt.to_dict() if receipt else None)


def retraining_error(manifest: dict, running: bool, waited: float, timeout: float) -> RetrainingError:
    """What `predict` raises when a deletion is retraining every active shard (see `SisaEnsemble.aggregator`)."""
    info = manifest.get("retraining") or {}
    rid = info.get("request_id")
    shards = [s for s, sh in enumerate(manifest["shards"]) if sh.get("excluded")]
    expected = info.get("expected_seconds")
    remaining = None if expected is None else max(0.0, info.get("started", 0.0) + expected - time.time())
    who = f"deletion request {rid}" if rid else "a deletion"
    if not running:
        msg = (
            f"every active shard ({shards}) is excluded by {who}, but no process is running it any more; "
            "SisaEnsemble.open(workdir) (or `sisa status`) finishes it, and predictions resume then"
        )
    else:
        eta = "its remaining time is unknown"
        if remaining is not None:
            eta = f"about {remaining:.0f} s of an estimated {expected:.0f} s remain (plan cost x measured throughput)"
        msg = (
            f"{who} is retraining every active shard ({shards}); {eta}. Waited {waited:.1f} s "
            f"(wait_timeout={timeout:g}); predictions resume as soon as it finishes: retry then, or open the "
            "ensemble with a larger wait_timeout"
        )
    return RetrainingError(
        msg, request_id=rid, remaining_seconds=remaining, shards=shards, waited=round(waited, 3), running=running
    )


def load_receipt(workdir, rid: str) -> Receipt:
    p = workdir.path / "receipts" / f"{rid}.json"
    if not p.exists():
        raise WorkdirError(f"no receipt {rid!r} in {workdir.path}/receipts")
    return Receipt.from_dict(json.loads(p.read_text()))
