"""Training figures: full ensemble fit on 1 and 2 Ray workers (shard-parallel scaling), the framework
against a hand-written torch loop doing the same sample-epochs, and one monolithic model on all rows.

The 1-worker fit is run twice, before and after the 2-worker one and the first deletions, and the figures
use their mean: on a shared virtual machine, throughput drifts by 10-20 % over minutes."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import plain_loop
from benchmarks.common import ratio, reset_workers, timed_fit, warm
from benchmarks.workloads import Size, sisa_config, warmup_config


def fit_on(size: Size, data, tmp: Path, name: str, workers: int, fresh_pool: bool = False):
    """Fit the timing workload with ``cluster.max_workers = workers`` on warm workers; (ensemble, figures).
    ``fresh_pool`` first ends every warm worker, so that a 1-worker fit has exactly one."""
    if fresh_pool:
        reset_workers()
    warm(warmup_config(size, workers), data, tmp / f"warm-{name}")
    return timed_fit(sisa_config(size, workers), data, tmp / name)


def weights(ens) -> dict:
    return {s: ens.load_shard_model(s).state_dict() for s in ens.active_shards()}


def same_weights(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(
        all(torch.equal(x, y) for x, y in zip(a[s].values(), b[s].values())) for s in a
    )


def reference(fits: list[dict]) -> dict:
    """The 1-worker full fit as the mean of fits taken before and after the phases compared with it, so that
    a machine that drifts faster or slower during the run does not decide the ratios (bracketing)."""
    keys = ("wall_seconds", "cpu_seconds", "stage_train_seconds", "stage_cpu_seconds")
    out = {k: sum(f[k] for f in fits) / len(fits) for k in keys}
    out.update({k: fits[0][k] for k in ("sample_epochs", "analytic_sample_epochs", "stages", "ensemble_accuracy")})
    out["runs"] = fits
    return out


def scaling(ref: dict, fit2: dict) -> dict:
    return {
        "fit_1_worker": ref,
        "fit_2_workers": fit2,
        "scaling_2_vs_1": ratio(ref["wall_seconds"], fit2["wall_seconds"]),
        # CPU-seconds per wall second, of the 1 or 2 cores a fit can use: other jobs lower it
        "cores_used_2_workers": ratio(fit2["cpu_seconds"], fit2["wall_seconds"]),
        "cores_used_1_worker": ratio(ref["cpu_seconds"], ref["wall_seconds"]),
    }


def plain_part(ens, size: Size, part: int) -> dict:
    """The plain loop on half of ``size.plain_loop_shards`` shards (part 0: the first half, 1: the second)."""
    n = min(size.plain_loop_shards, len(ens.manifest.shards))
    half = max(1, n // 2)
    shards = list(range(half)) if part == 0 else list(range(half, n)) or [0]
    return plain_loop.run(ens, shards)


def versus_plain_loop(parts: list[dict], fit1: dict) -> dict:
    """The whole 1-worker fit (Ray, Lightning, checkpoints, data files; ``fit1`` is the mean of the two
    reference fits) against the plain loop on the same model, run in two parts, each right after one of
    the reference fits, and scaled to the ensemble's sample-epochs."""
    plain = {k: sum(p[k] for p in parts) for k in ("wall_seconds", "cpu_seconds", "sample_epochs")}
    plain["shards"] = [s for p in parts for s in p["shards"]]
    scale = fit1["analytic_sample_epochs"] / plain["sample_epochs"]
    plain_full = plain["wall_seconds"] * scale
    return {
        "plain_loop": plain,
        "plain_loop_parts": parts,
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
