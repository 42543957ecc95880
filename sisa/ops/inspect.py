"""Read-only views of an ensemble: its status (shards, sizes, checkpoints, accuracy, deletions)."""

from __future__ import annotations

from sisa.ledger import RequestState
from sisa.manifest import Manifest


def status(ctx, m: Manifest) -> dict:
    active = set(ctx.active_shards(m))
    acc = m.metrics.get("shard_accuracy", {})
    shards = [
        {
            "shard": s,
            "rows": sh.rows,
            "slice_rows": [e.rows for e in sh.slices],
            "checkpoints": len(sh.checkpoints),
            "active": s in active,
            "accuracy": acc.get(str(s)),
        }
        for s, sh in enumerate(m.shards)
    ]
    reqs = ctx.ledger().requests() if (ctx.workdir.path / "ledger.db").exists() else []
    c = ctx.config
    return {
        "workdir": str(ctx.workdir.path),
        "name": c.name,
        "shards": shards,
        "slices": c.sharding.slices,
        "epochs_per_stage": list(c.epochs_per_stage()),
        "rows": sum(x["rows"] for x in shards),
        "ensemble_accuracy": m.metrics.get("ensemble_accuracy"),
        "deletions": {
            "done": sum(r["state"] == RequestState.DONE for r in reqs),
            "unfinished": sum(r["state"] != RequestState.DONE for r in reqs),
        },
        "config_hash": m.config_hash,
    }
