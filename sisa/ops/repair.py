"""The repair operation: find missing or corrupt checkpoints and rebuild them from the last clean one.

Training is deterministic and checkpoint names are content-addressed, so a rebuilt checkpoint has the
same bytes and name as the lost one and the manifest does not change. A corrupt *store* file cannot be
rebuilt (its rows exist nowhere else), nor can the shared start, its base rows or the frozen encoder
(``base/``): repair reports them and says how to recover.
"""

from __future__ import annotations

from orchestration import ShardPlan
from shards import training
from shards.errors import IntegrityError
from shards.storage import KEPT_PREFIX
from shards.store import read_slice
from sisa.manifest import Manifest

OP = "repair"


def check(ctx, m: Manifest) -> tuple[dict[int, int], list[str]]:
    """{shard: first bad stage (1-based)} and the list of corrupt store files."""
    store = ctx.storage()
    bad_stage: dict[int, int] = {}
    bad_store: list[str] = []
    for s, sh in enumerate(m.shards):
        for e in sh.slices:
            try:
                read_slice(store, e.to_dict())
            except IntegrityError:
                bad_store.append(store.describe(e.file))
        for c in sh.checkpoints:
            try:
                training.load_checkpoint(store.read(c.file, c.sha256), store.describe(c.file))
            except IntegrityError:
                bad_stage[s] = c.stage
                break
    return bad_stage, bad_store + _check_kept(store, m)


def _check_kept(store, m: Manifest) -> list[str]:
    """The shared start, its base rows and the encoder's weights that fail their digest: kept, never rebuilt."""
    files = []
    if m.base is not None:
        files.append((m.base.file, m.base.sha256))
        if m.base.rows_file is not None:
            files.append((m.base.rows_file.file, m.base.rows_file.sha256))
    if m.encoder is not None and m.encoder.file is not None:
        files.append((m.encoder.file, m.encoder.sha256))
    bad = []
    for file, digest in dict(files).items():
        try:
            store.read(file, digest)
        except IntegrityError:
            bad.append(store.describe(file))
    return bad


def repair(ctx) -> dict:
    """Rebuild bad checkpoints; returns {"repaired": {shard: from_stage}, "unrepairable": [files]}."""
    with ctx.workdir.lock(what="repair"):
        m = ctx.read_manifest()
        ctx.commit(m)
        bad_stage, bad_store = check(ctx, m)
        bad_shards = {s for s in range(len(m.shards)) for f in bad_store if f"/shard-{s:03d}/" in f}
        kept = ctx.storage().describe(KEPT_PREFIX)
        start_bad = any(f.startswith(kept) for f in bad_store)  # stage 1 is rebuilt from the start
        fixable = {s: r for s, r in bad_stage.items() if s not in bad_shards and not (start_bad and r == 1)}
        if fixable:
            _rebuild(ctx, m, fixable)
        if not bad_store:
            from sisa.ops.add import recover  # deletions, additions and compactions, in ledger order

            recover(ctx, locked=True)  # a request that failed on the damaged file is finished now
        return {"repaired": fixable, "unrepairable": bad_store}


def _rebuild(ctx, m: Manifest, fixable: dict[int, int]) -> None:
    plans = []
    for s, r in sorted(fixable.items()):
        sh = m.shards[s]
        prev = sh.checkpoints[r - 2].to_dict() if r > 1 else None
        slices = [e.to_dict() for e in sh.slices]
        plans.append(ShardPlan(shard=s, start_stage=r, slices=slices, prev=prev, epochs=sh.epochs))
    ctx.observer.started(OP, m, {})
    try:
        ctx.run_plans(OP, m, plans)
        for p in plans:
            want = [c.sha256 for c in m.shards[p.shard].checkpoints[p.start_stage - 1 :]]
            if want != [c["sha256"] for c in p.checkpoints]:
                raise IntegrityError(
                    f"shard {p.shard}: rebuilt checkpoints differ from the recorded ones; the store or "
                    "the environment changed (torch version, device). Refit with `sisa train --overwrite`",
                    shard=p.shard,
                )
        ctx.observer.finished(OP, m, plans, {"shards_repaired": len(plans)}, {}, None)
    except BaseException as e:
        ctx.observer.failed(OP, e)
        raise
    ctx.commit(m)
