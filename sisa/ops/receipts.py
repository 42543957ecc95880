"""Plans and receipts: what a deletion, an addition or a compaction will cost (`DeletionPlan`,
`AdditionPlan`, `CompactionPlan`) and what it did (`Receipt`, whose ``kind`` is "delete", "add" or
"compact"). A receipt's ``cost`` holds the exact figures of `sisa.costmodel` for the real partition and
each shard's own schedule: ``sample_epochs`` against ``full_retrain_sample_epochs``, the analytic
``expected_sample_epochs``, and with appended stages (``sharding.new_rows: append``)
``appended_stages_sample_epochs`` (the part of a deletion's cost spent on appended stages) and
``deletion_overhead_sample_epochs`` (what appended stages add to one later uniform deletion, in expectation).

A receipt is signed (HMAC-SHA256 with a key derived from the workdir's secret, over its canonical JSON)
and written to ``WORKDIR/receipts/<request id>.json`` before the model swap; `sisa.audit` re-checks it.
It names ids only as keyed hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import asdict, dataclass, field

from shards.errors import WorkdirError
from sisa.workdir import write_atomic


@dataclass(frozen=True)
class DeletionPlan:
    shards: dict[int, int]  # shard -> first stage to retrain (1-based)
    rows: int
    already_deleted: int
    sample_epochs: int
    full_retrain_sample_epochs: int
    speedup: float
    eval_rows: int = 0  # held-out evaluation rows among the ids (erased without retraining)
    # a deletion-aware placement: the expected cost of one request under the rows' priors (sisa.costmodel)
    expected_sample_epochs: float | None = None


@dataclass(frozen=True)
class AdditionPlan:
    """What `add` would do (`estimate_addition_cost`): shard -> first stage it retrains (canonical) or the
    stage it appends (append), and the cost in sample-epochs against a full refit of the live rows."""

    placement: str  # "canonical" or "append"
    shards: dict[int, int]
    rows: int
    sample_epochs: int
    full_retrain_sample_epochs: int
    speedup: float
    readmitted: int = 0
    expected_sample_epochs: float = 0.0  # the analytic expectation for that many uniformly hashed ids
    # append: what the appended stages add to the expected cost of one later uniform deletion
    deletion_overhead_sample_epochs: float = 0.0


@dataclass(frozen=True)
class CompactionPlan:
    """What `compact` would do (`estimate_compaction_cost`): refit the live rows into the canonical layout
    (= ``fit(live rows)``), at the cost of a full fit, and the deletion overhead it takes back to zero."""

    rows: int
    shards: int
    appended_slices: int  # slices beyond the config's R, over all shards
    sample_epochs: int  # the refit: costmodel.full_cost of the canonical layout
    deletion_overhead_sample_epochs: float  # expected extra cost of one uniform deletion now
    expected_deletion_sample_epochs_before: float
    expected_deletion_sample_epochs_after: float


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
    kind: str = "delete"  # "delete", "add" (rows_added, readmitted; deletes nothing) or "compact"
    rows_added: int = 0
    readmitted: list[str] = field(default_factory=list)  # hashed ids readmitted by an addition
    placement: str = ""  # an addition's: canonical or append
    signature: str = ""  # HMAC of every other field (`sign_receipt`)
    # not part of the signed receipt (nor of to_dict): what this call saw. A deletion's ``state`` when it
    # returned ("effective" or "done"), ``effective_at`` / ``done_at`` (epoch seconds), ``seconds_to_effective``
    # / ``seconds_to_done`` and ``phase_seconds`` (its fixed costs by phase, `sisa.ops.phases`)
    timing: dict | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("timing")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Receipt:
        d = dict(d)
        d.pop("timing", None)
        d["shards"] = {int(k): v for k, v in d.get("shards", {}).items()}
        return cls(**d)


def shard_entry(plan, before, **extra) -> dict:
    """A receipt's record of one retrained shard: the stage it restarted from, what it resumed from, and its
    checkpoints before and after (``before`` is the manifest the operation started from)."""
    return {
        "from_stage": plan.start_stage,
        **extra,
        "resumed_from": plan.prev["sha256"] if plan.prev else None,
        "checkpoints_before": [c.sha256 for c in before.shards[plan.shard].checkpoints[plan.start_stage - 1 :]],
        "checkpoints_after": [c["sha256"] for c in plan.checkpoints],
        "lineage_after": plan.checkpoints[-1]["lineage"] if plan.checkpoints else None,
    }


def _receipt_key(workdir) -> bytes:
    return hmac.new(workdir.secret(), b"sisa receipt signature v1", hashlib.sha256).digest()


def _canonical(d: dict) -> bytes:
    body = json.loads(json.dumps({k: v for k, v in d.items() if k != "signature"}))
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_receipt(workdir, receipt: dict) -> str:
    """HMAC-SHA256 of the receipt's canonical JSON (every field but ``signature``)."""
    return hmac.new(_receipt_key(workdir), _canonical(receipt), hashlib.sha256).hexdigest()


def path(workdir, rid: str):
    return workdir.path / "receipts" / f"{rid}.json"


def write(workdir, receipt: Receipt) -> None:
    write_atomic(path(workdir, receipt.request_id), json.dumps(receipt.to_dict(), indent=1).encode())


def load(workdir, rid: str) -> Receipt:
    p = path(workdir, rid)
    if not p.exists():
        raise WorkdirError(f"no receipt {rid!r} in {workdir.path}/receipts")
    return Receipt.from_dict(json.loads(p.read_text()))
