"""Shared plumbing of the benchmarks: the local Ray, the warm worker pool, stage logs and timing."""

from __future__ import annotations

import os
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from benchmarks.cpu import machine_busy_seconds, tree_cpu_seconds
from sisa import SisaEnsemble, costmodel


def init_ray(num_cpus: int = 2) -> bool:
    """A local Ray with ``num_cpus`` CPUs and no dashboard (auth off: local use only). Returns True if this
    call started it (so the caller shuts it down), False if the process had already joined one.

    Its workers run at the driver's priority: Ray starts them at nice 15 by default, and on a machine
    shared with other jobs that alone would slow the framework against the in-process baseline loop."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_worker_niceness", "0")
    import logging

    import ray

    if ray.is_initialized():
        return False
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


def reset_workers() -> None:
    """End every warm worker of this process's pool, so a run with cluster.max_workers=1 has exactly one.

    (The pool hands a borrower every free warm worker it wants, even above that borrower's max_workers.)
    """
    from orchestration import pool

    pool.shutdown_all()


def warm(cfg: dict, data, workdir: Path) -> None:
    """A tiny fit that starts the workers ``cfg`` asks for; its workdir is removed afterwards."""
    (X, y, ids), _ = data
    n = min(len(y), 64 * cfg["sharding"]["shards"] * cfg["sharding"]["slices"])
    with SisaEnsemble.from_config(cfg, workdir) as ens:
        ens.fit(X[:n], y[:n], ids=ids[:n])
    shutil.rmtree(workdir, ignore_errors=True)


class StageLog:
    """A `progress` callback collecting what every trained stage reported."""

    def __init__(self):
        self.stages: list[dict] = []

    def __call__(self, plan, entry, metrics) -> None:
        self.stages.append(metrics)

    @property
    def train_seconds(self) -> float:
        """Seconds the workers spent inside Lightning's fit (plus the capped train-accuracy pass)."""
        return sum(m["seconds"] for m in self.stages)

    @property
    def cpu_seconds(self) -> float:
        return sum(m.get("cpu_seconds", 0.0) for m in self.stages)

    @property
    def sample_epochs(self) -> int:
        return sum(e["samples"] for m in self.stages for e in m["epochs"])


@contextmanager
def timed():
    """``with timed() as t: ...`` then ``t.seconds`` (wall), ``t.cpu`` (CPU seconds of this process and
    its Ray shard workers) and ``t.others`` (cores other jobs on the machine used meanwhile, on average);
    NaN where /proc is missing."""

    class T:
        seconds = 0.0
        cpu = float("nan")
        others = float("nan")

    t = T()
    c0, m0 = tree_cpu_seconds(), machine_busy_seconds()
    w0 = time.perf_counter()
    try:
        yield t
    finally:
        t.seconds = time.perf_counter() - w0
        c1, m1 = tree_cpu_seconds(), machine_busy_seconds()
        if c0 is not None and c1 is not None:
            t.cpu = c1 - c0
            if m0 is not None and m1 is not None and t.seconds > 0:
                t.others = max(0.0, (m1[0] - m0[0]) - t.cpu) / t.seconds


def timed_fit(cfg: dict, data, workdir: Path) -> tuple[SisaEnsemble, dict]:
    """Fit ``cfg`` on ``data`` in a fresh workdir; wall time of the whole `fit` call and its stage log."""
    (X, y, ids), eval_set = data
    shutil.rmtree(workdir, ignore_errors=True)
    ens = SisaEnsemble.from_config(cfg, workdir)
    log = StageLog()
    with timed() as t:
        ens.fit(X, y, ids=ids, eval_set=eval_set, progress=log)
    rows, epochs = slice_rows(ens), ens.config.epochs_per_stage()
    return ens, {
        "wall_seconds": t.seconds,
        "cpu_seconds": t.cpu,
        "other_jobs_cores": t.others,
        "stage_train_seconds": log.train_seconds,
        "stage_cpu_seconds": log.cpu_seconds,
        "stages": len(log.stages),
        "sample_epochs": log.sample_epochs,
        "analytic_sample_epochs": costmodel.full_cost(rows, epochs),
        "ensemble_accuracy": ens.last_fit_metrics.get("ensemble_accuracy"),
    }


def slice_rows(ens: SisaEnsemble) -> list[list[int]]:
    return ens.manifest.slice_rows()


def machine() -> dict:
    import ray
    import torch

    return {
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "torch_threads_driver": torch.get_num_threads(),
    }


def best_of(fn, repeats: int, rounds: int = 5) -> float:
    """Smallest mean wall seconds of ``repeats`` calls over ``rounds`` rounds (less noise on a shared machine)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def summary(values) -> dict:
    v = np.asarray(list(values), float)
    return {"mean": float(v.mean()), "std": float(v.std()), "values": v.tolist()}
