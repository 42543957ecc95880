"""Append placement (``sharding.new_rows: append``): an addition forms one more slice at the end of each shard
its rows land in (the shard their id hashes to, as with canonical placement), trained as one more stage from
the shard's previous last checkpoint. Like every SISA stage it trains on all of the shard's slices so far
(slices 1..k), for ``sharding.append_epochs`` epochs (default: the schedule's last stage's epochs); the
shard's own schedule, one entry per slice, is recorded in the manifest (`ShardState.epochs`).

The appended stages stay: a later deletion in slice j retrains stages j..last, appended ones included, and
a deletion that empties an appended slice removes that slice and its stage (the later appended slices move
up one place, renamed, same bytes). Then, for any history, ``fit(D0).add(A1).delete(S1).add(A2)`` equals
``fit(D0 \\ S).add(A1 \\ S).add(A2 \\ S)`` bit for bit. `sisa.ops.compact` folds the appended slices back
into the canonical layout (= ``fit(live rows)``).
"""

from __future__ import annotations

import numpy as np

from orchestration import ShardPlan
from shards.partition import assign
from shards.schema import make_rows
from shards.store import write_encoded, write_slice
from sisa import costmodel
from sisa.manifest import Manifest, SliceRef
from sisa.ops.receipts import AdditionPlan


def targets(ctx, ids) -> dict[int, np.ndarray]:
    """{shard: row indices of the batch} by id hash, each shard's rows in canonical (rank) order."""
    c = ctx.config
    shard, _, rank = assign(ids, c.seed, c.sharding.shards, c.sharding.slices)
    order = np.lexsort((rank, shard))
    return {s: order[shard[order] == s] for s in sorted(set(shard.tolist()))}


def estimate(ctx, m: Manifest, ids, epochs: int, readmitted: int) -> AdditionPlan:
    """The plan of appending ``ids`` to ``m``: {shard: the stage it appends} and its cost (see `cost`)."""
    rows = m.slice_rows()
    sched = m.schedules(ctx.config.epochs_per_stage())
    stages = {}
    for s, idx in targets(ctx, ids).items():
        rows[s] = [*rows[s], len(idx)]
        sched[s] = (*sched[s], epochs)
        stages[s] = len(rows[s])
    c = cost(ctx, m.slice_rows(), rows, sched, sorted(stages), len(ids), epochs)
    return AdditionPlan(
        placement="append",
        shards=stages,
        rows=len(ids),
        sample_epochs=c["sample_epochs"],
        full_retrain_sample_epochs=c["full_retrain_sample_epochs"],
        speedup=c["speedup"],
        readmitted=readmitted,
        expected_sample_epochs=c["expected_sample_epochs"],
        deletion_overhead_sample_epochs=c["deletion_overhead_sample_epochs"],
    )


def cost(ctx, rows_before, rows_after, sched_after, shards, k: int, epochs: int) -> dict:
    """The exact cost of the appended stages (`costmodel.append_cost`), its expectation for K uniformly
    hashed ids, and what the appended stages add to the expected cost of one later uniform deletion."""
    out = costmodel.append_cost(rows_after, sched_after, shards)
    out["expected_sample_epochs"] = costmodel.expected_append(rows_before, epochs, k)
    out["appended_stage_epochs"] = epochs
    out["deletion_overhead_sample_epochs"] = costmodel.deletion_overhead(
        rows_after, sched_after, ctx.config.sharding.slices
    )
    return out


def merge(ctx, before: Manifest, batch: np.ndarray, epochs: int):
    """Write each shard's new slice; returns the new manifest (not committed), the shard plans (one stage
    each, from the shard's last checkpoint), each shard's appended stage and the rows added per shard."""
    store, base = ctx.storage(), ctx.config.epochs_per_stage()
    after, plans, starts, added = before, [], {}, {}
    for s, idx in targets(ctx, batch["id"]).items():
        sh = before.shards[s]
        j = len(sh.slices)
        ref = SliceRef.from_dict(
            write_slice(store, s, j, make_rows(batch["id"][idx], batch["y"][idx], batch["x"][idx], before.id_kind))
        )
        sched = (*sh.schedule(base), epochs)
        after = after.with_shard(s, slices=(*sh.slices, ref), epochs=sched)
        prev = sh.checkpoints[-1].to_dict() if sh.checkpoints else None
        plans.append(
            ShardPlan(
                shard=s,
                start_stage=j + 1,
                slices=[e.to_dict() for e in after.shards[s].slices],
                prev=prev,
                epochs=sched,
            )
        )
        starts[s], added[s] = j + 1, len(idx)
    return after, plans, starts, added


def squeeze(store, s: int, slices: list, epochs: tuple[int, ...] | None, canonical: int, first: int):
    """Drop the appended slices (index >= ``canonical``) a deletion emptied, so the shard is what a replay
    without the deleted rows builds (that replay appends no slice for a batch that left it no row). The later
    slices move up, rewritten under their new index (same bytes). Returns (slices, epochs, first stage)."""
    if epochs is None or len(slices) <= canonical:
        return slices, epochs, first
    keep = [j for j, e in enumerate(slices) if j < canonical or e.rows > 0]
    if len(keep) == len(slices):
        return slices, epochs, first
    gone = min(j for j in range(len(slices)) if j not in keep)
    out = []
    for new, old in enumerate(keep):
        e = slices[old]
        if new != old:
            data = store.read(e.file, e.sha256)
            e = SliceRef.from_dict(write_encoded(store, s, new, data, e.rows))
        out.append(e)
    sched = tuple(epochs[j] for j in keep)
    return out, (None if len(sched) == canonical else sched), min(first, gone + 1)
