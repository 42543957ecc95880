"""What the `sisa` command prints: progress bars, tables, the status and receipt summaries."""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import UTC, datetime

import click
from tqdm import tqdm


class Progress:
    """One tqdm bar per shard (stages done), or one overall bar when there are many shards. Called as the
    ``progress`` callback of `SisaEnsemble.fit`: ``(plan, entry, metrics)`` after every stage.

    When stderr is not a terminal (``sisa train | tee log``, CI) it prints one plain line per finished stage
    instead, with the time since the start and an ETA from the work left. A stage's work is weighted by the
    slices it trains on times its epochs (its sample-epochs, for equal slices)."""

    def __init__(self, shards: list[int], stages: dict[int, int], epochs: list[int] | None = None):
        self.per_shard = len(shards) <= 12
        quiet = self.quiet = not sys.stderr.isatty()
        self.t0, self.epochs = time.monotonic(), list(epochs) if epochs else None
        last = len(self.epochs) if self.epochs else max(stages.values(), default=0)
        self.total = sum(self._weight(r) for s in shards for r in range(last - stages[s] + 1, last + 1))
        self.done, self.count, self.stages = 0.0, 0, sum(stages.values())
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
    def for_grid(cls, shards: int, slices: int, epochs: list[int] | None = None) -> Progress:
        """Bars for a full fit: every shard trains every one of its ``slices`` stages (``epochs`` per stage)."""
        return cls(list(range(shards)), dict.fromkeys(range(shards), slices), epochs)

    def _weight(self, stage: int) -> float:
        return stage * (self.epochs[stage - 1] if self.epochs and stage <= len(self.epochs) else 1)

    def __call__(self, plan, entry, metrics):
        stage, acc = metrics["stage"], metrics.get("train_accuracy")
        if self.quiet:  # not a terminal (a log file, CI): one plain line per finished stage
            self.count += 1
            self.done += self._weight(stage)
            click.echo(
                f"shard {plan.shard}: stage {stage}/{len(plan.slices)} done, {metrics['rows']} rows"
                + (f", train acc {acc:.3f}" if acc is not None else "")
                + f"  [{self.count}/{self.stages} stages, {duration(time.monotonic() - self.t0)} elapsed"
                + (f", ETA {duration(self.eta())}]" if self.count < self.stages else "]"),
                err=True,
            )
            return
        bar = self.bars[plan.shard] if self.per_shard else self.bar
        bar.set_postfix_str(f"stage {stage} rows {metrics['rows']}" + (f" acc {acc:.3f}" if acc is not None else ""))
        bar.update(1)

    def eta(self) -> float:
        """Seconds left at the pace so far (work left over work done, times the time spent)."""
        spent = time.monotonic() - self.t0
        return spent * max(0.0, self.total - self.done) / self.done if self.done else float("nan")

    def close(self):
        for b in self.bars.values() if self.per_shard else [self.bar]:
            b.close()


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


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
            f"{s['checkpoints']}/{s.get('stages', len(s['slice_rows']))}",
            "yes" if s["active"] else "no",
            s["accuracy"],
        ]
        for s in st["shards"]
    ]
    out = table(rows, ["shard", "rows", "rows per slice", "checkpoints/stages", "active", "test acc"])
    acc = st["ensemble_accuracy"]
    out += f"\n\nensemble: {len(st['shards'])} shards x {st['slices']} slices, {st['rows']} training rows, "
    out += f"epochs per stage {st['epochs_per_stage']}, test accuracy {fmt(acc)}"
    for kind in ("deletions", "additions", "compactions"):
        if kind in st and (kind == "deletions" or sum(st[kind].values())):
            out += f"\n{kind}: {st[kind]['done']} done, {st[kind]['unfinished']} unfinished"
    if st.get("placement"):
        out += "\n" + placement_text(st["placement"])
    if st.get("base"):
        b = st["base"]
        init = f", model.init sha256 {b['init_sha256'][:12]}" if b["init_sha256"] else ""
        out += f"\nshared start {b['sha256'][:12]}: {b['rows']} non-erasable base rows{init}"
    if st.get("encoder"):
        e = st["encoder"]
        out += f"\nfrozen encoder {encoder_label(e)}: shards train heads on {e['width']} features"
    return out


def encoder_label(e: dict) -> str:
    """The start's body by its digest, or a user's module by import path (and its weights' digest, if any)."""
    if not e.get("module"):
        return f"{e['sha256'][:12]} (the start's body)"
    return e["module"] + (f" (weights sha256 {e['sha256'][:12]})" if e.get("sha256") else " (no weights)")


def placement_text(p: dict) -> str:
    """The deletion-aware placement's line of `sisa status`: expected cost per request under the priors,
    and the realised mean over the ledger's deletions (with what each expected), so a wrong prior shows."""
    r = p["realised"]
    line = (
        f"placement: {p['placement']} (risk >= {p['risk_threshold']} counts as likely); expected cost per request "
        f"{fmt(p['expected_sample_epochs'])} sample-epochs under the priors, "
        f"{fmt(p['expected_uniform_requests_sample_epochs'])} if requests were uniform"
    )
    if not r["requests"]:
        return line + "\nrealised: no deletion yet"
    line += f"\nrealised: {fmt(r['mean_sample_epochs'])} sample-epochs per request over {r['requests']} request(s)"
    if r["realised_over_expected"] is not None:
        ratio = r["realised_over_expected"]
        line += f" = {ratio:.2f}x the {fmt(r['mean_expected_sample_epochs'])} expected"
        if ratio > 1.5 and r["requests"] >= 10:
            line += " (the priors look wrong: refit with fit(..., risk=updated, overwrite=True))"
    return line


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
    if r.timing and r.timing.get("state") == "effective":
        out += (
            f"\neffective after {r.timing['seconds_to_effective']:.2f}s: the new models serve and the store holds "
            "no byte of the rows; the re-evaluation and MLflow work is owed (finished by the next command that "
            "opens the workdir, e.g. `sisa status`)"
        )
    elif r.timing and "seconds_to_done" in r.timing:
        out += (
            f"\ndone after {r.timing['seconds_to_done']:.2f}s (effective after {r.timing['seconds_to_effective']:.2f}s)"
        )
    return out


# -- machine-readable output ------------------------------------------------------------------------------
def finite(obj):
    """``obj`` with every non-finite float (inf, nan) as None, dict keys as str: what JSON can hold."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def to_json(obj) -> str:
    """Valid JSON (RFC 8259: no Infinity or NaN, which become null), indented for people."""
    return json.dumps(finite(obj), indent=1, allow_nan=False, ensure_ascii=False)


# -- errors in the command line's words ------------------------------------------------------------------
# (error class, the Python API's words, the CLI's): the engine's messages name its methods; the CLI names
# its options. Matched on the class and the exact phrase, so an error the table does not know is shown as is.
CLI_WORDS = (
    ("UnknownIdsError", "and call delete() again", "and run the command again (`sisa locate` says where ids are)"),
    ("DataError", "delete() needs at least one id; got an empty list", "no ids given: pass ids or --ids-file"),
    ("DataError", "no ids given: name at least one id", "no ids given: pass ids or --ids-file"),
    (
        "NotFittedError",
        "call .fit(X, y, ids=...) (or .fit() to load the config's dataset) first",
        "run `sisa train` first",
    ),
)


def cli_message(e: Exception) -> str:
    """The error's message, with the API's wording replaced by the command line's."""
    msg = str(e)
    names = {c.__name__ for c in type(e).__mro__}
    for cls, api, cli in CLI_WORDS:
        if cls in names:
            msg = msg.replace(api, cli)
    return msg


# -- deletion plans ---------------------------------------------------------------------------------------
def plan_dict(plan, expected_seconds: float | None, rate_from: str | None) -> dict:
    """A `DeletionPlan` as the fields of `sisa delete --dry-run --json` (documented in the README)."""
    return {
        "shards": [{"shard": s, "first_stage": r} for s, r in sorted(plan.shards.items())],
        "rows": plan.rows,
        "held_out_rows": plan.eval_rows,
        "already_deleted": plan.already_deleted,
        "sample_epochs": plan.sample_epochs,
        "full_retrain_sample_epochs": plan.full_retrain_sample_epochs,
        "speedup": plan.speedup,
        "expected_seconds": expected_seconds,
        "expected_from": rate_from,
    }


def plan_text(plan, n_ids: int, total_shards: int, stages: int, expected: float | None, rate_from: str | None) -> str:
    """A deletion plan for people: what would be retrained, what it costs, about how long it takes."""
    out = f"dry run: nothing was changed. Deleting {n_ids} id(s) would:"
    if plan.shards:
        out += f"\n  retrain {len(plan.shards)} of {total_shards} shard(s):"
        rows = [[s, r, f"{r}-{stages}" if r < stages else str(r)] for s, r in sorted(plan.shards.items())]
        out += "\n" + _indent(table(rows, ["shard", "first stage retrained", "stages retrained"]))
    else:
        out += "\n  retrain no shard"
    out += f"\n  remove {plan.rows} training row(s)"
    if plan.eval_rows:
        out += f" and {plan.eval_rows} held-out row(s) (erased from the evaluation file, nothing retrains)"
    if plan.already_deleted:
        out += f"\n  skip {plan.already_deleted} id(s) already deleted"
    if plan.sample_epochs:
        out += (
            f"\ncost: {plan.sample_epochs:,} sample-epochs against {plan.full_retrain_sample_epochs:,} for a full "
            f"retrain ({plan.speedup:.1f}x cheaper)"
        )
        if expected is not None:
            out += f"\nexpected time: about {duration(expected)} of training, at the pace {rate_from} measured"
    else:
        out += "\ncost: no training"
    return out


def _indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line for line in text.splitlines())


# -- where ids are (sisa locate) --------------------------------------------------------------------------
def show_id(i) -> str:
    """An id as typed: plain when it is plain, quoted (repr) when spaces or other characters would hide."""
    return i if isinstance(i, str) and i.isprintable() and i.strip() == i and i and " " not in i else repr(i)


def when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def location_dict(loc) -> dict:
    d = {"id": loc.id, "where": loc.where}
    if loc.where == "training":
        d |= {"shard": loc.shard, "slice": loc.slice, "first_stage": loc.slice + 1}
    if loc.where == "deleted":
        d |= {"request_id": loc.request_id, "deleted_at": datetime.fromtimestamp(loc.deleted_at, UTC).isoformat()}
    return d


def locations_text(locs: list) -> str:
    """One line per id asked about (and nothing about any other id)."""
    what = {
        "training": lambda x: (
            f"training row: shard {x.shard}, slice {x.slice} (a deletion retrains the shard from stage {x.slice + 1})"
        ),
        "held_out": lambda x: "held-out evaluation row (a deletion erases it; nothing retrains)",
        "base": lambda x: "base row: non-erasable (every shard starts from it); only a refit without it removes it",
        "deleted": lambda x: f"deleted by request {x.request_id} on {when(x.deleted_at)}",
        "unknown": lambda x: "unknown: not a row of this ensemble, and never deleted from it",
    }
    shown = [show_id(x.id) for x in locs]
    width = min(max(map(len, shown), default=0), 40)
    return "\n".join(f"{s.ljust(width)}  {what[x.where](x)}" for s, x in zip(shown, locs))


def addition_plan_text(plan, total_shards: int, stages: int) -> str:
    """An `AdditionPlan` for people (`sisa add --dry-run`)."""
    verb = "retrain" if plan.placement == "canonical" else "train one appended stage of"
    out = f"dry run: nothing was changed. Adding {plan.rows} row(s) ({plan.placement} placement) would:"
    out += f"\n  {verb} {len(plan.shards)} of {total_shards} shard(s):"
    rows = [[s, r, f"{r}-{stages}" if r < stages else str(r)] for s, r in sorted(plan.shards.items())]
    out += "\n" + _indent(table(rows, ["shard", "first stage trained", "stages"]))
    if plan.readmitted:
        out += f"\n  readmit {plan.readmitted} erased id(s) (recorded in the ledger)"
    return out + (
        f"\ncost: {plan.sample_epochs:,} sample-epochs against {plan.full_retrain_sample_epochs:,} for a full "
        f"refit ({plan.speedup:.1f}x cheaper)"
    )
