"""The `sisa` command: train, predict, status, locate, delete, validate, repair, demo, ui (and, from
`sisa.audit.cli`, audit, audit-example, publish). What it prints is rendered by `sisa.cli.render`.

Exit status: 0 done; 1 the command ran and reports a negative answer (an id not found by `locate`, a config
that does not validate, an unrepairable file, a failed audit); 2 an error (bad input, no ensemble ...).
`status`, `locate` and `delete --dry-run` read the workdir only: they start no Ray and import neither
Lightning nor torch (unless a crashed deletion must be finished first)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import numpy as np

import sisa  # `sisa.SisaEnsemble` resolves on first use: `sisa --help` does not import torch or Ray
from shards.ids import canonical_ids, parse_text_id, read_ids_file
from sisa import costmodel
from sisa import data as datamod
from sisa.audit.cli import audit, audit_example, publish
from sisa.cli import render
from sisa.cli.addinput import read_addition
from sisa.cli.demo import run as run_demo
from sisa.cli.quiet import hush
from sisa.cli.render import Progress, receipt_text, status_table, to_json
from sisa.config import load_config
from sisa.errors import ConfigError, SisaError, WorkdirError
from sisa.ops.purge import WAITS
from sisa.tracking.runs import Tracker, sqlite_path
from sisa.workdir import Workdir

JSON_HELP = "print valid JSON (RFC 8259: null for a missing or infinite value) instead of text"


def _fail(e: SisaError):
    click.echo(f"error: {render.cli_message(e)}", err=True)
    sys.exit(2)


@click.group()
@click.option("-v", "--verbose", count=True, help="also show the libraries' notices (Ray, MLflow, the UI server)")
@click.pass_context
def main(ctx, verbose):
    """sisa: train ensembles that can forget rows exactly."""
    ctx.obj = {"verbose": verbose}
    hush(verbose)


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--workdir", required=True, type=click.Path(file_okay=False), help="where the ensemble lives")
@click.option("--executor", type=click.Choice(["ray", "inprocess"]), default=None, help="override cluster.executor")
@click.option("--overwrite", is_flag=True, help="replace a trained ensemble in WORKDIR")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in the workdir)")
def train(config, workdir, executor, overwrite, tracking_uri):
    """Train the ensemble described by CONFIG into WORKDIR."""
    try:
        ens = sisa.SisaEnsemble.from_config(config, workdir, executor=executor, tracking_uri=tracking_uri)
        c = ens.config
        prog = Progress.for_grid(c.sharding.shards, c.sharding.slices, c.epochs_per_stage())
        try:
            ens.fit(overwrite=overwrite, progress=prog)
        finally:
            prog.close()
        click.echo(status_table(ens.status()))
        ens.close()
    except SisaError as e:
        _fail(e)


@main.command()
@click.option("--workdir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--input",
    "input_",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help=".npz with X (or a CSV/Parquet of features)",
)
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="write predictions here (.npy or .csv)")
@click.option("--proba", is_flag=True, help="print class probabilities instead of labels")
def predict(workdir, input_, output, proba):
    """Predict with the ensemble in WORKDIR."""
    try:
        ens = sisa.SisaEnsemble.open(workdir, executor="inprocess")
        X = _read_features(Path(input_))
        out = ens.predict_proba(X) if proba else ens.predict(X)
        if output:
            (np.savetxt(output, out, delimiter=",") if output.endswith(".csv") else np.save(output, out))
            click.echo(f"wrote {len(out)} predictions to {output}")
        else:
            np.savetxt(sys.stdout, out, fmt="%.6f" if proba else "%d", delimiter=",")
    except SisaError as e:
        _fail(e)


def _read_features(path: Path):
    """An .npz (array X) or .npy is positional; a CSV or Parquet file is a table whose columns the ensemble
    matches to its training features by name (`SisaEnsemble.predict_proba`)."""
    data = datamod.read_file(path, ("X",), suffixes=(".npz", ".npy", *datamod.TABLE_SUFFIXES))
    return data["X"] if isinstance(data, dict) else data


@main.command()
@click.option("--workdir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def status(workdir, as_json):
    """Shards, slices, sizes, checkpoints, accuracy and deletions of WORKDIR."""
    try:
        st = sisa.SisaEnsemble.open(workdir, executor="inprocess").status()
    except SisaError as e:
        _fail(e)
    click.echo(to_json(st) if as_json else status_table(st))


@main.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False))
def validate(configs):
    """Check CONFIGS and report every problem at once."""
    bad = 0
    for path in configs:
        try:
            load_config(path)
            click.echo(f"{path}: ok")
        except ConfigError as e:
            bad += 1
            click.echo(f"{path}: {len(e.problems)} problem(s)")
            for p in e.problems:
                click.echo(f"  - {p}")
    sys.exit(1 if bad else 0)


def _ids_options(f):
    """IDS arguments and --ids-file / --ids-format, as `delete` and `locate` take them."""
    f = click.argument("ids", nargs=-1)(f)
    f = click.option(
        "--ids-format",
        type=click.Choice(["lines", "nul", "json"]),
        default="lines",
        show_default=True,
        help="lines: one id per line, kept exactly (only the line end is removed: spaces are part of the id); "
        "nul: NUL-separated (for ids holding newlines, e.g. from `find -print0`); "
        "json: a JSON array of ints or strings (any id, exactly)",
    )(f)
    return click.option(
        "--ids-file",
        type=click.Path(exists=True, dir_okay=False, allow_dash=True),
        help="read ids from this file ('-' for stdin), in --ids-format",
    )(f)


@main.command()
@click.option("--workdir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--dry-run", is_flag=True, help="only show the plan: shards, stages, cost and expected time")
@click.option("--executor", type=click.Choice(["ray", "inprocess"]), default=None)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option(
    "--wait",
    type=click.Choice(WAITS),
    default="done",
    show_default=True,
    help="effective: return once the new models serve and the store holds no byte of the rows (the "
    "re-evaluation and MLflow work is owed, durably, and finished by the next command that opens the "
    "workdir, e.g. `sisa status`); done: once no copy is left anywhere, MLflow included",
)
@_ids_options
def delete(workdir, dry_run, executor, as_json, wait, ids_file, ids_format, ids):
    """Forget IDS exactly: retrain only the shards that held them, then purge every trace.

    Ids are matched exactly as written: for an ensemble with integer ids, only plain decimal integers
    (no leading zeros, '+', spaces or non-ASCII digits); for string ids, every character counts,
    spaces included. For ids with spaces or newlines use --ids-file with --ids-format json (or nul).
    `sisa locate` says where ids are (training, held out, deleted, unknown)."""
    try:
        ens = sisa.SisaEnsemble.open(workdir, executor="inprocess" if dry_run else executor)
        wanted = _request_ids(ens.manifest.id_kind, ids, ids_file, ids_format)
        if dry_run:
            _show_plan(ens, wanted, as_json)
            return
        r = ens.delete(wanted, wait=wait)
        ens.close()
    except SisaError as e:
        _fail(e)
    click.echo(to_json({**r.to_dict(), "timing": r.timing}) if as_json else receipt_text(r))


def _show_plan(ens, wanted: list, as_json: bool) -> None:
    plan = ens.estimate_deletion_cost(wanted)
    m, c = ens.manifest, ens.config
    rate, source = m.metrics.get("seconds_per_sample_epoch"), "the last retrain"
    if rate is None and m.metrics.get("fit_seconds"):
        full = costmodel.full_cost(m.slice_rows(), c.epochs_per_stage())
        rate, source = m.metrics["fit_seconds"] / max(1, full), "the fit"
    expected = plan.sample_epochs * rate if rate is not None else None
    if as_json:
        click.echo(to_json({"ids": len(set(wanted)), **render.plan_dict(plan, expected, source if rate else None)}))
    else:
        n = len(set(wanted))
        click.echo(render.plan_text(plan, n, c.sharding.shards, c.sharding.slices, expected, source))


@main.command()
@click.option("--workdir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_ids_options
def locate(workdir, as_json, ids_file, ids_format, ids):
    """Say where each of IDS is: a training row (shard, slice), a held-out row, deleted (by which request,
    when) or unknown. Prints only the ids asked about. Exit status 0: every id is a row of the ensemble;
    1: some are deleted or unknown; 2: an error."""
    try:
        ens = sisa.SisaEnsemble.open(workdir, executor="inprocess")
        locs = ens.locate(_request_ids(ens.manifest.id_kind, ids, ids_file, ids_format))
    except SisaError as e:
        _fail(e)
    click.echo(to_json([render.location_dict(x) for x in locs]) if as_json else render.locations_text(locs))
    sys.exit(0 if all(x.found for x in locs) else 1)


def _request_ids(kind: str, args, ids_file, ids_format) -> list:
    """The ids named on the command line and in the ids file, canonical for an ensemble of ``kind``."""
    wanted = [parse_text_id(t, kind) for t in args]
    if ids_file:
        data = sys.stdin.buffer.read() if ids_file == "-" else Path(ids_file).read_bytes()
        entries = read_ids_file(data, ids_format)
        if ids_format == "json":
            wanted += canonical_ids(entries, kind)[0].tolist() if entries else []
        else:
            wanted += [parse_text_id(t, kind) for t in entries]
    if not wanted:
        raise SisaError("no ids given: pass ids as arguments or with --ids-file", ids=[])
    return wanted


@main.command()
@click.option("--workdir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--executor", type=click.Choice(["ray", "inprocess"]), default=None)
def repair(workdir, executor):
    """Rebuild missing or corrupt checkpoints from the last clean one (bit-identical)."""
    try:
        ens = sisa.SisaEnsemble.open(workdir, executor=executor, recover=False)
        out = ens.repair()
        ens.close()
    except SisaError as e:
        _fail(e)
    for s, r in sorted(out["repaired"].items()):
        click.echo(f"shard {s}: rebuilt checkpoints from stage {r}; identical to the recorded digests")
    for f in out["unrepairable"]:
        click.echo(
            f"{f}: corrupt or missing store file that cannot be rebuilt (rows, the shared start or the encoder). "
            "Restore it from a backup, or refit with `sisa train --overwrite`"
        )
    if not out["repaired"] and not out["unrepairable"]:
        click.echo("all checkpoints and store files match their digests")
    sys.exit(1 if out["unrepairable"] else 0)


@main.command()
@click.option("--workdir", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--executor", type=click.Choice(["ray", "inprocess"]), default=None)
@click.option("--overwrite", is_flag=True, help="replace what WORKDIR holds (a previous demo)")
def demo(workdir, executor, overwrite):
    """Train the digits ensemble, delete a few rows, and show what happened."""
    try:
        run_demo(workdir, executor, overwrite)
    except SisaError as e:
        _fail(e)


@main.command()
@click.option("--workdir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--port", type=int, default=None, help="refused if in use  [default: 5000, or a free port if 5000 is busy]"
)
@click.pass_context
def ui(ctx, workdir, port):
    """Open the MLflow UI on WORKDIR's tracking store (a local `mlflow server` on 127.0.0.1).

    Runs until Ctrl-C or SIGTERM, which stop the server and its workers; `sisa -v ui` shows the server's log."""
    from sisa.cli import ui as server

    wd = Workdir(workdir)
    if not (wd.path / "config.yaml").exists():
        _fail(WorkdirError(f"{wd.path} holds no sisa ensemble (no config.yaml); pass the workdir you trained in"))
    tracker = Tracker(load_config(wd.path / "config.yaml"), wd)
    db = sqlite_path(tracker.uri)
    if db is None:  # tracking.uri is a server: its own UI is the window
        click.echo(f"{wd.path} logs to {tracker.uri}: open it there (experiment {tracker.experiment!r})")
        return
    if not db.exists():
        _fail(
            WorkdirError(
                f"no MLflow store at {db}: tracking.enabled is false in {wd.path / 'config.yaml'} "
                "or nothing was trained with tracking on"
            )
        )
    port = server.choose_port(port)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracker.uri]
    cmd += ["--artifacts-destination", str(wd.path / "mlartifacts")]  # never ./mlartifacts in the cwd
    cmd += ["--host", server.HOST, "--port", str(port), "--workers", "1"]
    sys.exit(server.serve(cmd, env, port, f"experiment {tracker.experiment!r}", bool(ctx.obj["verbose"])))


main.add_command(audit)
main.add_command(audit_example)
main.add_command(publish)


# -- continual data (issue 13): `sisa add` -------------------------------------------------------------
@main.command("add")
@click.option("--workdir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--input",
    "input_",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="the new rows: .npz with X, y, ids, or a CSV/Parquet with the training schema (columns by name)",
)
@click.option(
    "--readmit",
    "readmit_file",
    type=click.Path(exists=True, dir_okay=False),
    help="ids file of erased ids whose owners consented again (recorded in the ledger), in --readmit-format",
)
@click.option("--readmit-format", type=click.Choice(["lines", "nul", "json"]), default="lines", show_default=True)
@click.option(
    "--risk-column",
    default=None,
    help="the column of INPUT (npz: array) with each row's deletion prior (default data.risk_column); "
    "needed when sharding.placement is not uniform",
)
@click.option("--dry-run", is_flag=True, help="only check the rows and show the plan: shards, stages and cost")
@click.option("--executor", type=click.Choice(["ray", "inprocess"]), default=None)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def add_rows(workdir, input_, readmit_file, readmit_format, risk_column, dry_run, executor, as_json):
    """Add the rows of INPUT to the ensemble without a refit (erased ids are refused unless readmitted)."""
    try:
        ens = sisa.SisaEnsemble.open(workdir, executor=executor)
        X, y, ids, risk = read_addition(Path(input_), ens, risk_column)
        kind = ens.manifest.id_kind
        readmit = _request_ids(kind, (), readmit_file, readmit_format) if readmit_file else None
        if dry_run:
            plan = ens.estimate_addition_cost(X, y, ids=ids, readmit=readmit, risk=risk)
            c = ens.config.sharding
            click.echo(to_json(plan.__dict__) if as_json else render.addition_plan_text(plan, c.shards, c.slices))
            return
        r = ens.add(X, y, ids=ids, readmit=readmit, risk=risk)
        ens.close()
    except SisaError as e:
        _fail(e)
    click.echo(to_json(r.to_dict()) if as_json else _addition_text(r))


def _addition_text(r) -> str:
    from sisa.cli.render import table

    rows = [
        [s, v["from_stage"], v["rows_added"], (v["checkpoints_after"] or ["-"])[-1][:12]]
        for s, v in sorted(r.shards.items())
    ]
    out = f"request {r.request_id}: {r.rows_added} row(s) added ({r.placement} placement)"
    if r.readmitted:
        out += f", {len(r.readmitted)} readmitted"
    out += "\n" + table(rows, ["shard", "from stage", "rows added", "final checkpoint"])
    c = r.cost
    out += f"\ntrained {c['sample_epochs']} sample-epochs vs {c['full_retrain_sample_epochs']} for a full refit"
    return out + f" ({c['speedup']:.1f}x cheaper), wall time {r.wall_seconds:.2f}s"


# -- continual data (issue 13): `sisa compact` ---------------------------------------------------------
@main.command("compact")
@click.option("--workdir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--dry-run", is_flag=True, help="only show the plan: appended slices, the refit's cost")
@click.option("--executor", type=click.Choice(["ray", "inprocess"]), default=None)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def compact(workdir, dry_run, executor, as_json):
    """Refit the live rows into the canonical layout (after `sharding.new_rows: append` additions): the
    result equals a fit of the live rows, bit for bit; durable and crash-safe like a deletion."""
    try:
        ens = sisa.SisaEnsemble.open(workdir, executor="inprocess" if dry_run else executor)
        if dry_run:
            plan = ens.estimate_compaction_cost()
            click.echo(to_json(plan.__dict__) if as_json else _compaction_plan_text(plan))
            return
        r = ens.compact()
        ens.close()
    except SisaError as e:
        _fail(e)
    if as_json:
        click.echo(to_json(r.to_dict()))
    elif r.request_id is None:
        click.echo("nothing to compact: no shard has an appended slice (the layout is canonical)")
    else:
        c = r.cost
        click.echo(
            f"request {r.request_id}: compacted {len(r.shards)} shard(s) into the canonical layout; trained "
            f"{c['sample_epochs']} sample-epochs, wall time {r.wall_seconds:.2f}s"
        )


def _compaction_plan_text(p) -> str:
    return (
        f"{p.appended_slices} appended slice(s) over {p.shards} shards, {p.rows} live rows\n"
        f"compaction refits every shard: {p.sample_epochs} sample-epochs\n"
        f"expected cost of one uniform deletion: {p.expected_deletion_sample_epochs_before:.0f} sample-epochs now "
        f"({p.deletion_overhead_sample_epochs:.0f} of them for appended stages), "
        f"{p.expected_deletion_sample_epochs_after:.0f} after compaction"
    )
