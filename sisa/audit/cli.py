"""`sisa audit`: re-verify deletion certificates and run the membership-inference audit from the shell.

  sisa audit --workdir W --receipt ID       retrain the receipt's shards from scratch in a fresh process, compare
  sisa audit --workdir W --all              every live shard, every receipt, the whole ledger
  sisa audit --workdir W --mia-deleted D.npz   membership inference on the deleted rows (X, y kept by the auditor)
  sisa publish --workdir W                  log the deployed ensemble as a new @current version, purge the others

The audit writes nothing into the workdir (with --log-run it logs an MLflow 'audit' run into the tracking
store, which by default is the workdir's mlflow.db).

  sisa audit-example [DIR]                  the README's worked example: train, delete, then audit, in DIR

Exit status 0: every certificate check passed; 1: a check failed (the output says where); 2: bad input.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click
import numpy as np

import sisa  # `sisa.SisaEnsemble` resolves on first use: `sisa --help` does not import torch or Ray
from sisa.audit.report import AuditReport
from sisa.data import read_file
from sisa.errors import SisaError


def read_rows(path: str | None):
    """The rows an auditor keeps, ``(X, y)`` from an .npz with arrays X and y (None for no path)."""
    if path is None:
        return None
    z = read_file(path, ("X", "y"), suffixes=(".npz",))
    return z["X"], z["y"]


def _merge(reports):
    if len(reports) == 1:
        return reports[0]
    out = AuditReport(scope=", ".join(r.scope for r in reports))
    for r in reports:
        out.checks += r.checks
        out.shards.update({s: out.shards.get(s, True) and ok for s, ok in r.shards.items()})
        out.receipts.update({q: out.receipts.get(q, True) and ok for q, ok in r.receipts.items()})
        out.retrain_seconds += r.retrain_seconds
        out.seconds += r.seconds
        out.worker_pid = r.worker_pid or out.worker_pid
        out.start = r.start or out.start
    return out


@click.command("audit")
@click.option("--workdir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--receipt", "receipts", multiple=True, help="request id of a receipt to re-verify (repeatable)")
@click.option("--all", "everything", is_flag=True, help="check every live shard, receipt and ledger entry")
@click.option(
    "--mia-deleted",
    type=click.Path(exists=True, dir_okay=False),
    help=".npz with X, y of the deleted rows: run the membership-inference audit on them",
)
@click.option(
    "--mia-heldout",
    type=click.Path(exists=True, dir_okay=False),
    help=".npz with X, y of rows never trained on (default: the workdir's evaluation rows)",
)
@click.option(
    "--mia-population",
    type=click.Path(exists=True, dir_okay=False),
    help=".npz with X, y for the reference models, disjoint from the rest (default: half the held-out rows)",
)
@click.option("--references", default=4, show_default=True, help="reference models of the calibrated attack (0: off)")
@click.option("--baseline/--no-baseline", default=True, help="also run approximate gradient ascent (NOT exact)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--log-run", is_flag=True, help="log an MLflow 'audit' run (metrics, ROC plot) into the tracking store")
def audit(
    workdir, receipts, everything, mia_deleted, mia_heldout, mia_population, references, baseline, as_json, log_run
):
    """Re-verify deletion certificates (bit-for-bit retraining from scratch), check what MLflow serves, and
    audit membership inference. Writes nothing into the workdir unless --log-run is given."""
    if not (receipts or everything or mia_deleted):
        raise click.UsageError("say what to audit: --receipt ID (repeatable), --all, and/or --mia-deleted ROWS.npz")
    try:
        ens = sisa.SisaEnsemble.open(workdir, executor="inprocess", recover=False)
        certs = [ens.verify(r) for r in receipts] + ([ens.verify(None)] if everything else [])
        cert = _merge(certs) if certs else None
        mia = None
        if mia_deleted:
            from sisa.audit import mia as attacks  # torch, scipy: only when an attack runs

            mia = attacks.membership_audit(
                ens._ctx,
                ens.manifest,
                deleted=read_rows(mia_deleted),
                heldout=read_rows(mia_heldout),
                population=read_rows(mia_population),
                references=references,
                baseline=baseline,
                exact_cost=attacks.deletion_cost(ens._ctx),
            )
        run_id = None
        if log_run and ens.config.tracking.enabled:
            from sisa.audit.mia import log_audit  # torch, mlflow: only when a run is logged

            run_id = log_audit(ens._ctx, ens.manifest, mia, cert)
    except SisaError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if as_json:
        out = {"certificate": cert.to_dict() if cert else None, "mia": mia.to_dict() if mia else None}
        click.echo(json.dumps(_finite({**out, "mlflow_run_id": run_id}), indent=1, allow_nan=False))
    else:
        if cert is not None:
            click.echo(cert.text())
        if mia is not None:
            click.echo(("\n" if cert else "") + mia.text())
        if run_id:
            click.echo(f"\nMLflow audit run {run_id} (ROC plot: audit/roc.png); see `sisa ui --workdir {workdir}`")
    sys.exit(1 if cert is not None and not cert.ok else 0)


def _finite(obj):
    """JSON can hold no inf or NaN (RFC 8259): they become null, as in every `sisa ... --json`."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    return [_finite(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


@click.command("publish")
@click.option("--workdir", required=True, type=click.Path(exists=True, file_okay=False))
def publish(workdir):
    """Publish the deployed ensemble to MLflow as a new `@current` version (with fresh digests) and purge
    every other version: the fix when `sisa audit` finds a changed or stale model artifact."""
    try:
        ens = sisa.SisaEnsemble.open(workdir, executor="inprocess")
        if not ens.config.tracking.enabled:
            raise click.UsageError("tracking is off in this workdir's config: there is no MLflow model to publish")
        ctx = ens._ctx
        with ctx.workdir.lock(what="publish"):
            mv = ctx.tracker().publish(ctx, ctx.read_manifest(), purge=True, force=True)
    except SisaError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    name = ens._ctx.tracker().model_name
    click.echo(f"published models:/{name}/{mv.version} as @current" if mv else "no shard to serve")


def example(workdir: str, seed: int = 1) -> list[str]:
    """The README's worked example: train on synthetic rows, delete 100 rows in two requests, then audit.

    The rows an auditor keeps (deleted, held-out, population) are written next to the workdir, in
    ``<workdir>-auditor/``, never inside it. Returns the `sisa audit` arguments to run."""
    from sklearn.datasets import make_classification  # scikit-learn takes a second to import: only here

    wd, aud = Path(workdir), Path(f"{workdir}-auditor")
    for d in (wd, aud):
        shutil.rmtree(d, ignore_errors=True)
    aud.mkdir(parents=True)
    X, y = make_classification(
        n_samples=1700, n_features=30, n_informative=6, n_redundant=0, n_classes=4, flip_y=0.1, class_sep=0.8,
        random_state=seed,
    )  # fmt: skip
    X, ids = X.astype(np.float32), np.arange(len(y))
    tr, te, pop = slice(0, 700), slice(700, 1000), slice(1000, 1700)
    cfg = {
        "name": "audit-example",
        "seed": seed,
        "sharding": {"shards": 2, "slices": 2},
        "model": {"name": "mlp", "kwargs": {"hidden": [128]}},
        "training": {"epochs": 60, "batch_size": 32, "lr": 0.005},
        "cluster": {"executor": "inprocess"},
    }
    ens = sisa.SisaEnsemble.from_config(cfg, wd).fit(X[tr], y[tr], ids=ids[tr], eval_set=(X[te], y[te]))
    gone = ids[tr][::7]  # 100 rows, deleted in two requests
    ens.delete(gone[:60].tolist())
    ens.delete(gone[60:].tolist())
    np.savez(aud / "deleted.npz", X=X[gone], y=y[gone])
    np.savez(aud / "population.npz", X=X[pop], y=y[pop])
    ens.close()
    return ["--workdir", str(wd), "--all", "--mia-deleted", str(aud / "deleted.npz"), "--mia-population", str(aud / "population.npz")]  # fmt: skip


@click.command("audit-example")
@click.argument("workdir", default="runs/audit-example", type=click.Path(file_okay=False))
@click.option("--seed", default=1, show_default=True, help="seed of the synthetic data and of the ensemble")
def audit_example(workdir, seed):
    """The README's worked audit example: train on synthetic rows into WORKDIR (replacing it), delete 100 rows
    in two requests, then run `sisa audit --all --mia-deleted ... --mia-population ...` on it. The auditor's
    rows go to WORKDIR-auditor/, never into WORKDIR."""
    try:
        args = example(workdir, seed=seed)
    except SisaError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo("$ sisa audit " + " ".join(args) + "\n")
    audit.main(args, prog_name="sisa audit")
