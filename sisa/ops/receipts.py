"""Plans and receipts: what a deletion or an addition will cost (`DeletionPlan`, `AdditionPlan`) and what
it did (`Receipt`, whose ``kind`` is "delete" or "add").

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
    expected_sample_epochs: float = 0.0  # the analytic expectation for that many uniform ids (canonical)


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
    kind: str = "delete"  # "delete", or "add" (an addition: rows_added, readmitted; deletes nothing)
    rows_added: int = 0
    readmitted: list[str] = field(default_factory=list)  # hashed ids readmitted by an addition
    placement: str = ""  # an addition's: canonical or append
    signature: str = ""  # HMAC of every other field (`sign_receipt`)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Receipt:
        d = dict(d)
        d["shards"] = {int(k): v for k, v in d.get("shards", {}).items()}
        return cls(**d)


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
