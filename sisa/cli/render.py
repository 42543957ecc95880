"""What the `sisa` command prints: progress bars, tables, the status and receipt summaries."""

from __future__ import annotations

import sys

import click
from tqdm import tqdm


class Progress:
    """One tqdm bar per shard (stages done), or one overall bar when there are many shards. Called as the
    ``progress`` callback of `SisaEnsemble.fit`: ``(plan, entry, metrics)`` after every stage."""

    def __init__(self, shards: list[int], stages: dict[int, int]):
        self.per_shard = len(shards) <= 12
        quiet = self.quiet = not sys.stderr.isatty()
        if self.per_shard:
            self.bars = {
                s: tqdm(
                    total=stages[s],
                    desc=f"shard {s:3d}",
                    unit="stage",
                    position=i,
                    leave=True,
                    file=sys.stderr,
                    disable=quiet,
                )
                for i, s in enumerate(shards)
            }
        else:
            self.bar = tqdm(total=sum(stages.values()), desc="stages", unit="stage", file=sys.stderr, disable=quiet)

    @classmethod
    def for_grid(cls, shards: int, slices: int) -> Progress:
        """Bars for a full fit: every shard trains every one of its ``slices`` stages."""
        return cls(list(range(shards)), dict.fromkeys(range(shards), slices))

    def __call__(self, plan, entry, metrics):
        if self.quiet:  # not a terminal (a log file, CI): one plain line per finished shard
            if metrics["stage"] == len(plan.slices):
                acc = metrics.get("train_accuracy")
                click.echo(
                    f"shard {plan.shard}: stages {plan.start_stage}-{metrics['stage']} done, "
                    f"{metrics['rows']} rows" + (f", train acc {acc:.3f}" if acc is not None else ""),
                    err=True,
                )
            return
        bar = self.bars[plan.shard] if self.per_shard else self.bar
        acc = metrics.get("train_accuracy")
        bar.set_postfix_str(
            f"stage {metrics['stage']} rows {metrics['rows']}" + (f" acc {acc:.3f}" if acc is not None else "")
        )
        bar.update(1)

    def close(self):
        for b in self.bars.values() if self.per_shard else [self.bar]:
            b.close()


def fmt(v) -> str:
    """One table cell: floats to 4 places, None as '-'."""
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def table(rows: list[list], header: list[str]) -> str:
    """A plain right-aligned text table with a dashed rule under the header."""
    cells = [[str(c) for c in header]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def status_table(st: dict) -> str:
    """`SisaEnsemble.status()` as a table of shards and a summary of the ensemble and its deletions."""
    rows = [
        [
            s["shard"],
            s["rows"],
            "/".join(map(str, s["slice_rows"])),
            s["checkpoints"],
            "yes" if s["active"] else "no",
            s["accuracy"],
        ]
        for s in st["shards"]
    ]
    out = table(rows, ["shard", "rows", "rows per slice", "checkpoints", "active", "test acc"])
    acc = st["ensemble_accuracy"]
    out += f"\n\nensemble: {len(st['shards'])} shards x {st['slices']} slices, {st['rows']} training rows, "
    out += f"epochs per stage {st['epochs_per_stage']}, test accuracy {fmt(acc)}"
    out += f"\ndeletions: {st['deletions']['done']} done, {st['deletions']['unfinished']} unfinished"
    return out


def receipt_text(r) -> str:
    """A deletion `Receipt` as a summary line, a table of the retrained shards and the cost saved."""
    if r.request_id is None:
        return f"nothing to do: {r.already_deleted} id(s) were already deleted"
    rows = [
        [
            s,
            v["from_stage"],
            v["rows_removed"],
            (v["resumed_from"] or "fresh init")[:12],
            (v["checkpoints_after"] or ["-"])[-1][:12],
        ]
        for s, v in sorted(r.shards.items())
    ]
    out = f"request {r.request_id}: {r.rows_deleted} row(s) deleted"
    if r.already_deleted:
        out += f", {r.already_deleted} already deleted before"
    out += "\n" + table(rows, ["shard", "from stage", "rows removed", "resumed from", "final checkpoint"])
    c = r.cost
    if c:
        out += f"\nretrained {c['sample_epochs']} sample-epochs vs {c['full_retrain_sample_epochs']} for a full retrain"
        out += f" ({c['speedup']:.1f}x cheaper), wall time {r.wall_seconds:.2f}s"
    return out
