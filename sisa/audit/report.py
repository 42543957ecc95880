"""The audit's report (`Check`, `AuditReport`) and the receipts' HMAC signature, shared by `sisa.audit.certificate`,
`sisa.audit.published` and the deletion path that signs receipts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# the receipts' signature lives with the receipts (engine); re-exported for the audit's callers
from sisa.ops.receipts import sign_receipt  # noqa: E402, F401


# -- the report ---------------------------------------------------------------------------------------
@dataclass
class Check:
    target: str  # "shard 3", "receipt <id>", "ledger", "store"
    check: str  # what was checked
    ok: bool
    detail: str = ""  # on failure: where (file path or receipt field) and what differs


@dataclass
class AuditReport:
    scope: str
    checks: list[Check] = field(default_factory=list)
    shards: dict[int, bool] = field(default_factory=dict)  # retrained from scratch == deployed, per shard
    receipts: dict[str, bool] = field(default_factory=dict)
    worker_pid: int | None = None
    # the shared start every shard was retrained from (shards.base): its sha256, lineage, model.init digest
    start: dict | None = None
    retrain_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def add(self, target: str, check: str, problems: list[str]) -> None:
        self.checks.append(Check(target, check, not problems, "; ".join(problems[:5])))

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def text(self) -> str:
        width = max([len(c.target) for c in self.checks] + [6])
        lines = [f"{'target'.ljust(width)}  result  check"]
        for c in self.checks:
            lines.append(f"{c.target.ljust(width)}  {'pass' if c.ok else 'FAIL'}    {c.check}")
            if c.detail:
                lines.append(f"{''.ljust(width)}          -> {c.detail}")
        per = ", ".join(f"{s}: {'pass' if v else 'FAIL'}" for s, v in sorted(self.shards.items()))
        lines.append(f"\nshards retrained from scratch in a fresh process (pid {self.worker_pid}): {per or 'none'}")
        if self.start:
            init = self.start["init_sha256"]
            lines.append(
                f"from the shared start {self.start['sha256'][:12]} ({self.start['rows']} base rows"
                + (f", model.init sha256 {init[:12]})" if init else ")")
            )
        n = len(self.failures())
        lines.append(
            f"audit of {self.scope}: {'PASS' if self.ok else f'FAIL ({n} failed check(s))'} in {self.seconds:.1f}s"
        )
        return "\n".join(lines)
