"""Training figures: full ensemble fit on 1 and 2 Ray workers (shard-parallel scaling), the framework
against a hand-written torch loop doing the same sample-epochs, and one monolithic model on all rows."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import plain_loop
from benchmarks.common import ratio, reset_workers, timed_fit, warm
from benchmarks.workloads import Size, sisa_config, warmup_config


def fits(size: Size, data, tmp: Path):
    """Fit the timing workload on one worker, then on two (same data, same config but max_workers).

    Returns (ensemble fitted on 1 worker, ensemble fitted on 2 workers, figures)."""
    reset_workers()
    warm(warmup_config(size, 1), data, tmp / "warm1")
    ens1, fit1 = timed_fit(sisa_config(size, 1), data, tmp / "w1")
    warm(warmup_config(size, 2), data, tmp / "warm2")
    ens2, fit2 = timed_fit(sisa_config(size, 2), data, tmp / "w2")
    same = all(
        all(
            torch.equal(a, b)
            for a, b in zip(
                ens1.load_shard_model(s).state_dict().values(), ens2.load_shard_model(s).state_dict().values()
            )
        )
        for s in ens1.active_shards()
    )
    return (
        ens1,
        ens2,
        {
            "fit_1_worker": fit1,
            "fit_2_workers": fit2,
            "scaling_2_vs_1": ratio(fit1["wall_seconds"], fit2["wall_seconds"]),
            # CPU-seconds the 2-worker fit got per wall second, of the 2 it could use: other jobs lower it
            "cores_used_2_workers": ratio(fit2["cpu_seconds"], fit2["wall_seconds"]),
            "cores_used_1_worker": ratio(fit1["cpu_seconds"], fit1["wall_seconds"]),
            "weights_identical_1_vs_2_workers": same,
        },
    )


def versus_plain_loop(ens, size: Size, fit1: dict) -> dict:
    """The whole 1-worker fit (Ray, Lightning, checkpoints, data files) against the plain loop on the same
    model, scaled from ``size.plain_loop_shards`` shards to the ensemble's sample-epochs."""
    shards = list(range(min(size.plain_loop_shards, len(ens.manifest["shards"]))))
    plain = plain_loop.run(ens, shards)
    scale = fit1["analytic_sample_epochs"] / plain["sample_epochs"]
    plain_full = plain["wall_seconds"] * scale
    return {
        "plain_loop": plain,
        "plain_loop_seconds_scaled_to_ensemble": plain_full,
        "framework_vs_plain": ratio(fit1["wall_seconds"], plain_full),
        "framework_cpu_vs_plain_cpu": ratio(fit1["cpu_seconds"], plain["cpu_seconds"] * scale),
        "framework_stage_cpu_vs_plain_cpu": ratio(fit1["stage_cpu_seconds"], plain["cpu_seconds"] * scale),
        "plain_seconds_per_sample_epoch": plain["wall_seconds"] / plain["sample_epochs"],
        "framework_seconds_per_sample_epoch": fit1["wall_seconds"] / fit1["analytic_sample_epochs"],
    }


def monolithic(size: Size, data, tmp: Path) -> dict:
    """One model (S=1, R=1) on all rows for e epochs: the naive retrain a deletion would otherwise need."""
    cfg = sisa_config(size, 1, shards=1, slices=1, name="monolithic")
    ens, fit = timed_fit(cfg, data, tmp / "mono")
    ens.close()
    return fit
