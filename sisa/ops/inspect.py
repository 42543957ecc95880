"""Read-only views of an ensemble: its status (shards, sizes, stages, accuracy, deletions, additions)."""

from __future__ import annotations

from sisa import costmodel
from sisa.ledger import RequestState
from sisa.manifest import Manifest
from sisa.risk import summary as risk_summary


def status(ctx, m: Manifest) -> dict:
    active = set(ctx.active_shards(m))
    acc = m.metrics.get("shard_accuracy", {})
    shards = [
        {
            "shard": s,
            "rows": sh.rows,
            "slice_rows": [e.rows for e in sh.slices],
            "checkpoints": len(sh.checkpoints),
            "stages": sh.stages,  # the config's slices plus any appended (sharding.new_rows: append)
            "epochs_per_stage": list(sh.schedule(ctx.config.epochs_per_stage())),
            "active": s in active,
            "accuracy": acc.get(str(s)),
        }
        for s, sh in enumerate(m.shards)
    ]
    reqs = _requests(ctx)
    c = ctx.config
    out = {
        "workdir": str(ctx.workdir.path),
        "name": c.name,
        "shards": shards,
        "slices": c.sharding.slices,
        "epochs_per_stage": list(c.epochs_per_stage()),
        "rows": sum(x["rows"] for x in shards),
        "ensemble_accuracy": m.metrics.get("ensemble_accuracy"),
        "deletions": _count(reqs, "delete"),
        "additions": _count(reqs, "add"),
        "compactions": _count(reqs, "compact"),
        "config_hash": m.config_hash,
        # the shared start (shards.base): non-erasable base rows and/or a pretrained state dict
        "base": None
        if m.base is None
        else {"rows": m.base.rows, "sha256": m.base.sha256, "init_sha256": m.base.init_sha256},
        # model.encoder: the frozen body whose features the slices hold (shards.encoder)
        "encoder": None if m.encoder is None else m.encoder.to_dict(),
    }
    placed = risk_summary(m, c)
    if placed is not None:  # a deletion-aware placement: expected cost under the priors vs what was realised
        receipts = [r["receipt"] for r in ctx.ledger().requests() if r["receipt"]] if reqs else []
        placed["realised"] = costmodel.realised(receipts)
        out["placement"] = placed
    return out


def _requests(ctx) -> list[tuple[str, bool]]:
    """(kind, done) of every ledger request: a done one's kind is its receipt's, an unfinished one's its plan's."""
    if not (ctx.workdir.path / "ledger.db").exists():
        return []
    ledger = ctx.ledger()
    pending = {r["id"]: r["plan"].get("kind", "delete") for r in ledger.unfinished()}
    out = []
    for r in ledger.requests():
        done = r["state"] == RequestState.DONE
        kind = (r["receipt"] or {}).get("kind", "delete") if done else pending.get(r["id"], "delete")
        out.append((kind, done))
    return out


def _count(reqs: list[tuple[str, bool]], kind: str) -> dict:
    return {
        "done": sum(k == kind and done for k, done in reqs),
        "unfinished": sum(k == kind and not done for k, done in reqs),
    }
