"""Deletion figures, on the ensemble fitted on one worker (so wall time is compute: one worker at a time).

- One deletion, stratified: one row from each slice position j (a different shard each), so the mean over
  a uniformly chosen row is E[T] = sum_j w_j T_j with w_j the share of rows in position j; two rounds
  after each of the two 1-worker fits are averaged. Its speedup over the full fit is compared with the analytic
  bound (costmodel, real partition) and with S*3R/(2R+1).
- K ids in one call: the wall time converted to sample-epochs with the full fit's measured seconds per
  sample-epoch, against costmodel.expected_batched (and against the plan's exact cost for the ids drawn;
  the draw's luck is measured against 20,000 simulated draws of plan costs on the real partition).
- Overhead: wall time minus the workers' time inside Lightning's fit, with MLflow tracking off and on.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import StageLog, ratio, slice_rows, timed
from shards.store import read_slice
from sisa import SisaEnsemble, costmodel


def _delete(ens: SisaEnsemble, ids: list[int]) -> dict:
    rows, epochs = slice_rows(ens), ens.config.epochs_per_stage()
    plan = ens.estimate_deletion_cost(ids)
    log = StageLog()
    with timed() as t:
        receipt = ens.delete(ids, progress=log)
    assert receipt.rows_deleted == len(ids), receipt
    return {
        "ids": len(ids),
        "shards": {int(s): int(r) for s, r in plan.shards.items()},
        "wall_seconds": t.seconds,
        "cpu_seconds": t.cpu,
        "other_jobs_cores": t.others,
        "retrain_seconds": log.train_seconds,
        "overhead_seconds": t.seconds - log.train_seconds,
        "overhead_cpu_seconds": t.cpu - log.cpu_seconds,
        "stages": len(log.stages),
        "plan_sample_epochs": plan.sample_epochs,  # the dry run, on the rows before the deletion
        "receipt_sample_epochs": receipt.cost.get("sample_epochs"),  # the same on the rows that remain
        "retrained_sample_epochs": log.sample_epochs,  # counted by the workers, epoch by epoch
        "full_sample_epochs": costmodel.full_cost(rows, epochs),
        "rows_before": rows,
    }


def _ids_in(ens: SisaEnsemble, shard: int, slice_: int) -> np.ndarray:
    return read_slice(ens.storage(), ens.manifest.shards[shard].slices[slice_].to_dict())["id"]


def single_round(ens: SisaEnsemble, rng: np.random.Generator) -> list[dict]:
    """One deletion per slice position j (1..R), each in a different shard."""
    S, R = len(ens.manifest.shards), ens.config.sharding.slices
    runs = []
    for j in range(R):
        run = _delete(ens, [int(rng.choice(_ids_in(ens, j % S, j)))])
        run["slice"] = j + 1
        runs.append(run)
    return runs


def single(ens: SisaEnsemble, windows: list[tuple[dict, list[list[dict]]]], rows0: list[list[int]]) -> dict:
    """The stratified estimate of E[T] and the speedup over the full 1-worker fit.

    ``windows``: [(a 1-worker fit, the rounds of deletions run right after it), ...]. The speedup is the
    mean fit time over the mean E[T] of all rounds, so that a slow or fast patch of the machine does not
    decide it; each window's own ratio is reported too. ``rows0``: slice sizes before the first deletion."""
    fit1 = {
        k: sum(f[k] for f, _ in windows) / len(windows) for k in ("wall_seconds", "cpu_seconds", "stage_train_seconds")
    }
    fit1["sample_epochs"] = windows[0][0]["sample_epochs"]
    rounds = [rnd for _, rnds in windows for rnd in rnds]
    S, R = len(rows0), len(rows0[0])
    epochs = ens.config.epochs_per_stage()
    n = sum(map(sum, rows0))
    weights = [sum(r[j] for r in rows0) / n for j in range(R)]

    def expect(key, rounds=rounds):
        return sum(sum(w * r[key] for w, r in zip(weights, runs)) for runs in rounds) / len(rounds)

    expected_t, expected_cpu, expected_retrain = (
        expect("wall_seconds"),
        expect("cpu_seconds"),
        expect("retrain_seconds"),
    )
    bound = costmodel.expected_speedup(rows0, epochs)
    speedup = ratio(fit1["wall_seconds"], expected_t)
    runs = [r for rnd in rounds for r in rnd]
    return {
        "runs": runs,
        "rounds": len(rounds),
        "round_speedups_over_bound": [
            ratio(ratio(fit1["wall_seconds"], sum(w * r["wall_seconds"] for w, r in zip(weights, rnd))), bound)
            for rnd in rounds
        ],
        "window_speedups_over_bound": [  # each fit against the rounds run right after it
            ratio(ratio(f["wall_seconds"], expect("wall_seconds", rnds)), bound) for f, rnds in windows
        ],
        "slice_weights": weights,
        "expected_seconds": expected_t,
        "expected_cpu_seconds": expected_cpu,
        "expected_retrain_seconds": expected_retrain,
        "expected_sample_epochs": costmodel.expected_single(rows0, epochs),
        "speedup_vs_full_ensemble": speedup,
        "bound_real_partition": bound,
        "bound_formula": costmodel.speedup_bound(S, R),
        "speedup_over_bound": ratio(speedup, bound),
        "cpu_speedup_over_bound": ratio(ratio(fit1["cpu_seconds"], expected_cpu), bound),
        "retrain_only_speedup_over_bound": ratio(fit1["stage_train_seconds"] / expected_retrain, bound),
        "fit_sample_epochs_per_second": fit1["sample_epochs"] / fit1["stage_train_seconds"],
        "deletion_sample_epochs_per_second": [r["retrained_sample_epochs"] / r["retrain_seconds"] for r in runs],
        "overhead_seconds": [r["overhead_seconds"] for r in runs],
        "overhead_cpu_seconds": [r["overhead_cpu_seconds"] for r in runs],
    }


def sampled_plan_costs(rows: list[list[int]], epochs, k: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """Plan cost (`costmodel.plan_cost`) of ``draws`` random sets of K distinct rows of the real partition:
    the empirical distribution that `costmodel.expected_batched` summarises by its mean."""
    flat = [(s, j) for s, r in enumerate(rows) for j in range(len(r))]
    bounds = np.cumsum([rows[s][j] for s, j in flat])
    out = np.empty(draws)
    for d in range(draws):
        starts: dict[int, int] = {}
        for pos in np.searchsorted(bounds, rng.choice(bounds[-1], size=k, replace=False), side="right"):
            s, j = flat[pos]
            starts[s] = min(starts.get(s, j + 1), j + 1)
        out[d] = costmodel.plan_cost(rows, epochs, starts)["sample_epochs"]
    return out


def batched(
    ens: SisaEnsemble, ks, fit1: dict, singles: dict, rng: np.random.Generator, draws: int = 20000
) -> list[dict]:
    """K uniformly drawn ids per call, converted with ``fit1``'s seconds per sample-epoch; K=1 is the
    stratified single-deletion estimate (`single`), against its own reference.

    One executed draw is one sample of a random cost, so besides the raw measured / expected of that draw,
    the estimate of E[measured] / expected is the draw's efficiency (measured / its exact plan cost) times
    the mean plan cost over ``draws`` simulated draws on the real partition, divided by the formula."""
    sec_per_se = fit1["wall_seconds"] / fit1["analytic_sample_epochs"]
    cpu_per_se = fit1["cpu_seconds"] / fit1["analytic_sample_epochs"]
    epochs = ens.config.epochs_per_stage()
    out = []
    for k in ks:
        rows = slice_rows(ens)
        expected = costmodel.expected_batched(rows, epochs, k)
        sim = sampled_plan_costs(rows, epochs, k, draws, np.random.default_rng(1000 + k)) if k > 1 else None
        if k == 1:  # the stratified mean over all rounds against the reference fit: 1 / (speedup / bound)
            wall, plan_se, done_se = singles["expected_seconds"], expected, None
            measured = expected / singles["speedup_over_bound"]
            cpu = expected / singles["cpu_speedup_over_bound"] * cpu_per_se
            run = {"stratified": True}
        else:
            live = np.concatenate([_ids_in(ens, s, j) for s in range(len(rows)) for j in range(len(rows[s]))])
            run = _delete(ens, [int(i) for i in rng.choice(live, size=k, replace=False)])
            wall, plan_se, done_se = run["wall_seconds"], run["plan_sample_epochs"], run["retrained_sample_epochs"]
            cpu = run["cpu_seconds"]
            measured = wall / sec_per_se
        mean_plan = float(sim.mean()) if sim is not None else plan_se  # K=1: the stratified mean is exact
        out.append(
            {
                "k": k,
                "expected_sample_epochs": expected,
                "simulated_mean_plan_sample_epochs": mean_plan,
                "simulated_plan_std": float(sim.std()) if sim is not None else 0.0,
                "simulated_mean_over_expected": ratio(mean_plan, expected),
                "draw_percentile": float((sim < plan_se).mean() * 100) if sim is not None else None,
                "sequential_expected_sample_epochs": costmodel.expected_sequential(rows, epochs, k),
                "plan_sample_epochs": plan_se,
                "retrained_sample_epochs": done_se,
                "wall_seconds": wall,
                "measured_sample_epochs": measured,
                "measured_over_expected": ratio(measured, expected),
                "cpu_measured_over_expected": ratio(cpu / cpu_per_se, expected),
                "measured_over_plan": ratio(measured, plan_se),
                "plan_over_expected": ratio(plan_se, expected),
                "estimated_measured_over_expected": ratio(measured, plan_se) * ratio(mean_plan, expected),
                "cpu_estimated_measured_over_expected": ratio(cpu / cpu_per_se, plan_se) * ratio(mean_plan, expected),
                "full_sample_epochs": costmodel.full_cost(rows, epochs),
                **{
                    k2: v
                    for k2, v in run.items()
                    if k2 in ("shards", "overhead_seconds", "stratified", "other_jobs_cores")
                },
            }
        )
    return out


def tracked(workdir: Path, count: int, rng: np.random.Generator) -> dict:
    """Deletions with MLflow tracking on (the config in the workdir switched on; weights do not depend on
    it). The first creates the MLflow store and registered model and is reported apart. Each deletes one
    row of a last slice, so only one stage is retrained."""
    import sisa.tracking.runs as tracking

    cfg_path = Path(workdir) / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["tracking"] = {**cfg.get("tracking", {}), "enabled": True}
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    spent = {"finish": 0.0, "publish": 0.0}
    originals = (tracking.MLflowObserver.finished, tracking.Tracker.publish)

    def clock(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0

        return wrapper

    tracking.MLflowObserver.finished = clock("finish", originals[0])
    tracking.Tracker.publish = clock("publish", originals[1])
    runs = []
    try:
        ens = SisaEnsemble.open(workdir)
        R = ens.config.sharding.slices
        for i in range(count + 1):
            spent.update(finish=0.0, publish=0.0)
            shard = (i + 1) % len(ens.manifest.shards)
            run = _delete(ens, [int(rng.choice(_ids_in(ens, shard, R - 1)))])
            run.update(mlflow_finish_seconds=spent["finish"], mlflow_publish_seconds=spent["publish"])
            runs.append(run)
        ens.close()
    finally:
        tracking.MLflowObserver.finished, tracking.Tracker.publish = originals
    steady = runs[1:]
    return {
        "first": runs[0],
        "runs": steady,
        "overhead_seconds": [r["overhead_seconds"] for r in steady],
        "overhead_cpu_seconds": [r["overhead_cpu_seconds"] for r in steady],
        "mlflow_finish_seconds": [r["mlflow_finish_seconds"] for r in steady],
        "mlflow_publish_seconds": [r["mlflow_publish_seconds"] for r in steady],
    }
