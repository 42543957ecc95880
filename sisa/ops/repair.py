"""`sisa repair`: find missing or corrupt checkpoints and rebuild them from the last clean one.

Training is deterministic and checkpoint names are content-addressed, so a rebuilt checkpoint has the
same bytes and name as the lost one and the manifest does not change. A corrupt *store* file cannot be
rebuilt (its rows exist nowhere else): repair reports it and says how to recover.
"""

from __future__ import annotations

from orchestration import ShardPlan
from shards import training
from shards.errors import IntegrityError
from shards.store import read_slice


def check(ens, manifest: dict) -> tuple[dict[int, int], list[str]]:
    """{shard: first bad stage (1-based)} and the list of corrupt store files."""
    store = ens.storage()
    bad_stage: dict[int, int] = {}
    bad_store: list[str] = []
    for s, sh in enumerate(manifest["shards"]):
        for e in sh["slices"]:
            try:
                read_slice(store, e)
            except IntegrityError:
                bad_store.append(store.describe(e["file"]))
        for c in sh["checkpoints"]:
            try:
                training.load_checkpoint(store.read(c["file"], c["sha256"]), store.describe(c["file"]))
            except IntegrityError:
                bad_stage[s] = c["stage"]
                break
    return bad_stage, bad_store


def repair(ens) -> dict:
    """Rebuild bad checkpoints; returns {"repaired": {shard: from_stage}, "unrepairable": [files]}."""
    with ens.workdir.lock(what="repair"):
        manifest = ens.workdir.read_manifest()
        ens._manifest = manifest
        bad_stage, bad_store = check(ens, manifest)
        bad_shards = {s for s in range(len(manifest["shards"])) for f in bad_store if f"/shard-{s:03d}/" in f}
        fixable = {s: r for s, r in bad_stage.items() if s not in bad_shards}
        plans = []
        for s, r in sorted(fixable.items()):
            sh = manifest["shards"][s]
            plans.append(
                ShardPlan(shard=s, start_stage=r, slices=sh["slices"], prev=sh["checkpoints"][r - 2] if r > 1 else None)
            )
        if plans:
            with ens.tracker().operation("repair", manifest) as run:
                ens.run_plans(manifest, plans, lambda p, e, m: run.stage(p.shard, m))
                for p in plans:
                    want = [c["sha256"] for c in manifest["shards"][p.shard]["checkpoints"][p.start_stage - 1 :]]
                    got = [c["sha256"] for c in p.checkpoints]
                    if want != got:
                        raise IntegrityError(
                            f"shard {p.shard}: rebuilt checkpoints differ from the recorded ones; the store or "
                            "the environment changed (torch version, device). Refit with `sisa train --overwrite`",
                            shard=p.shard,
                        )
                run.finish(ens, plans, {"shards_repaired": len(plans)})
            ens.commit(manifest)
        if not bad_store:
            from sisa.ops.delete import recover

            recover(ens, locked=True)  # a deletion that failed on the damaged file is finished now
        return {"repaired": fixable, "unrepairable": bad_store}
