"""Purges: every copy of erased rows that sisa holds, in one place.

The store's superseded slices and checkpoints (zeroed, then removed), temp files and stale copies in the
workdir, the warm workers' caches, and in MLflow every registered model version that saw the rows. A
request is marked done only after all of them succeeded; if one fails (MLflow down, say), the request
stays unfinished and the next open finishes it.
"""

from __future__ import annotations

from sisa import evalfile
from sisa.failpoints import crashpoint
from sisa.ledger import RequestState
from sisa.manifest import Manifest
from sisa.ops import receipts
from sisa.workdir import purge_unreferenced


def unreferenced(ctx, m: Manifest | None, on_delete=None) -> list[str]:
    """Store files ``m`` does not name (None: all of them)."""
    return purge_unreferenced(ctx.storage(), m, on_delete=on_delete)


def finish(ctx, m: Manifest, rid: str, receipt, run_id: str | None) -> None:
    """Purge what the swap superseded, everywhere, then mark the request done."""
    unreferenced(ctx, m, on_delete=lambda: crashpoint("during_purge"))
    ctx.workdir.remove_stale_copies()  # temp files, a killed fit's spill and evaluation file
    evalfile.discard_old(ctx.workdir.path)  # a superseded evaluation file a crash left unzeroed
    ctx.drop_caches()
    ctx.publish(m, purge=True, request_id=rid, run_id=run_id)  # the new version; every other one is deleted
    if receipt is None:
        p = receipts.path(ctx.workdir, rid)
        receipt = receipts.load(ctx.workdir, rid) if p.exists() else None
    ctx.ledger().set_state(rid, RequestState.DONE, receipt.to_dict() if receipt else None)
