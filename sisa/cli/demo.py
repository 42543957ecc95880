"""`sisa demo`: train the digits ensemble, compare with one model on all the data, delete rows, show it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

import sisa
from sisa import costmodel
from sisa.cli.render import Progress, receipt_text, status_table
from sisa.config import load_config
from sisa.errors import WorkdirError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"  # the repository's configs/


def run(workdir: str, executor: str | None, overwrite: bool = False) -> None:
    """Train, compare, delete and report in ``workdir``; a non-empty ``workdir`` is replaced only with
    ``overwrite`` (a `WorkdirError` names the flag otherwise), and the output says it was."""
    wd = Path(workdir)
    if wd.exists() and any(wd.iterdir()):
        if not overwrite:
            raise WorkdirError(
                f"{wd} already exists (a previous demo?); pass --overwrite to replace it, or --workdir for another place"
            )
        click.echo(f"replacing {wd} (--overwrite)")
        shutil.rmtree(wd)
    cfg = load_config(CONFIG)
    click.echo(f"== training {cfg.sharding.shards} shards x {cfg.sharding.slices} slices on digits into {wd} ==")
    ens = sisa.SisaEnsemble.from_config(cfg, wd, executor=executor)
    S, R = cfg.sharding.shards, cfg.sharding.slices
    prog = Progress.for_grid(S, R, cfg.epochs_per_stage())
    t = time.time()
    ens.fit(progress=prog)
    prog.close()
    click.echo(f"trained in {time.time() - t:.1f}s\n")
    click.echo(status_table(ens.status()))

    base = load_config(
        {
            **cfg.model_dump(mode="json"),
            "sharding": {"shards": 1, "slices": 1},
            "training": {**cfg.training.model_dump(mode="json"), "schedule": "uniform"},
            "tracking": {"enabled": False},
            "cluster": {"executor": "inprocess"},
        }
    )
    single = sisa.SisaEnsemble.from_config(base, wd / "baseline-single-model").fit()
    click.echo(
        f"\none model on all the training data: test accuracy {single.last_fit_metrics['ensemble_accuracy']:.4f}"
    )

    ids = ["digits-17", "digits-942", "digits-1000", "digits-1500"]
    click.echo(f"\n== deleting {len(ids)} rows: {', '.join(ids)} ==")
    plan = ens.estimate_deletion_cost(ids)
    click.echo(
        f"plan: shards {plan.shards} (shard: first stage to retrain), {plan.speedup:.1f}x cheaper than a full retrain"
    )
    rows = ens.manifest.slice_rows()
    sched = cfg.epochs_per_stage()
    click.echo(
        f"(for reference: one random row costs {costmodel.full_cost(rows, sched) / costmodel.expected_single(rows, sched):.1f}x "
        f"less than a full retrain on average; the bound S*3R/(2R+1) is {costmodel.speedup_bound(S, R):.1f}x)"
    )
    receipt = ens.delete(ids)
    click.echo(receipt_text(receipt))
    click.echo(f"\nensemble test accuracy after the deletion: {ens.status()['ensemble_accuracy']:.4f}")
    click.echo(f"receipt saved in {wd / 'receipts' / (receipt.request_id + '.json')}")
    click.echo(
        f"MLflow UI: sisa ui --workdir {wd}   (or: mlflow ui --backend-store-uri sqlite:///{(wd / 'mlflow.db').resolve()})"
    )
    ens.close()
