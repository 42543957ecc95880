"""The training step against the plain loop and the arithmetic limit: ``python -m benchmarks.engine_bench``.

For one MLP, optimizer and batch size, on one thread in this process, the same sample-epochs:
  - the plain torch loop (`benchmarks.plain_loop.train_shard`: eager autograd, torch's Adam);
  - sisa's stage training (`shards.training.run_stage`: the direct loop of `shards.loop`, the sampler,
    metrics) with
    ``training.engine: eager`` and with ``fast`` (`shards.fast`);
  - the arithmetic limit: the step's GEMMs alone (forward, weight and input gradients, the model's own
    shapes), timed back to back; their FLOPs over that time is the measured sgemm rate.
Each is run ``repeats`` times interleaved; the ratios use medians, the spread is min..max over all
pairings; ``paired`` is each repeat's plain over fast (run back to back: the same machine load), in
wall and in this thread's CPU time (far less sensitive to other jobs), median [min, max].
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from benchmarks import plain_loop
from shards import training
from shards.models import MLP
from shards.spec import TrainSpec

WORKLOADS = {
    # the side-by-side workload of issue 19, and the suite's timing workload (benchmarks.workloads "full")
    "mlp-64-128-10-b64": {"features": 64, "hidden": (128,), "classes": 10, "batch": 64, "rows": 12_800, "epochs": 3},
    "suite-40-256x256-4-b128": {
        "features": 40,
        "hidden": (256, 256),
        "classes": 4,
        "batch": 128,
        "rows": 12_800,
        "epochs": 2,
    },
}


def _data(w: dict):
    rng = np.random.default_rng(0)
    rows = np.zeros(w["rows"], dtype=[("x", np.float32, (w["features"],)), ("y", np.int64)])
    rows["x"] = rng.standard_normal((w["rows"], w["features"]))
    rows["y"] = rng.integers(0, w["classes"], w["rows"])
    return rows


def _framework(w: dict, rows, engine: str) -> float:
    spec = TrainSpec(
        seed=0,
        model="mlp",
        model_kwargs={"hidden": list(w["hidden"])},
        optim={"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.0, "lr_gamma": 1.0},
        epochs_per_stage=(w["epochs"],),
        batch_size=w["batch"],
        input_shape=(w["features"],),
        num_classes=w["classes"],
        extra={"engine": engine},
    )
    t0, c0 = time.perf_counter(), time.thread_time()
    _, metrics = training.run_stage(spec, 0, 1, None, rows, "bench")
    assert metrics["engine"] == engine
    return time.perf_counter() - t0, time.thread_time() - c0


def _plain(w: dict, rows) -> float:
    X, y = torch.from_numpy(np.ascontiguousarray(rows["x"])), torch.from_numpy(np.ascontiguousarray(rows["y"]))
    torch.manual_seed(0)
    t0, c0 = time.perf_counter(), time.thread_time()
    plain_loop.train_shard(
        [(X, y, w["epochs"])], lambda: MLP((w["features"],), w["classes"], hidden=w["hidden"]), 1e-3, w["batch"]
    )
    return time.perf_counter() - t0, time.thread_time() - c0


def gemm_limit(w: dict, reps: int = 300) -> dict:
    """Seconds per step of the step's GEMMs alone, and the sgemm rate they run at (FLOP/s)."""
    widths = [w["features"], *w["hidden"], w["classes"]]
    B = w["batch"]
    shapes, flops = [], 0
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        x, W, g = torch.randn(B, a), torch.randn(b, a), torch.randn(B, b)
        shapes.append((x, W, g, i > 0))
        flops += 2 * B * a * b * (3 if i > 0 else 2)  # forward, weight gradient, input gradient (not layer 1)

    def step():
        for x, W, g, back in shapes:
            torch.mm(x, W.t())
            torch.mm(g.t(), x)
            if back:
                torch.mm(g, W)

    for _ in range(20):
        step()
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(reps):
        step()
    seconds, cpu = (time.perf_counter() - t0) / reps, (time.thread_time() - c0) / reps
    return {
        "flops_per_step": flops,
        "gemm_seconds_per_step": seconds,
        "sgemm_gflops": flops / seconds / 1e9,
        "gemm_cpu_seconds_per_step": cpu,
        "sgemm_gflops_cpu": flops / cpu / 1e9,
    }


def run(name: str, repeats: int = 3) -> dict:
    w = WORKLOADS[name]
    rows = _data(w)
    steps = w["epochs"] * -(-w["rows"] // w["batch"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _framework({**w, "epochs": 1}, rows[: w["batch"] * 4], "fast")  # imports and first-call costs
        runs: dict[str, list[tuple[float, float]]] = {"plain": [], "eager": [], "fast": []}
        for _ in range(repeats):
            runs["plain"].append(_plain(w, rows))
            runs["eager"].append(_framework(w, rows, "eager"))
            runs["fast"].append(_framework(w, rows, "fast"))
        limit = gemm_limit(w)
    finally:
        torch.set_num_threads(threads)
    ms = {k: [1000 * wall / steps for wall, _ in v] for k, v in runs.items()}
    cpu_ms = {k: [1000 * cpu / steps for _, cpu in v] for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in ms.items()}
    # per repeat, plain and fast ran back to back: their ratio sees the same machine load
    paired = [p / f for p, f in zip(ms["plain"], ms["fast"])]
    paired_cpu = [p / f for p, f in zip(cpu_ms["plain"], cpu_ms["fast"])]
    gemm_ms = 1000 * limit["gemm_seconds_per_step"]
    return {
        "workload": {**w, "hidden": list(w["hidden"]), "steps": steps, "optimizer": "adam", "threads": 1},
        "ms_per_step": ms,
        "median_ms_per_step": med,
        "plain_over_fast": med["plain"] / med["fast"],
        "plain_over_eager": med["plain"] / med["eager"],
        "eager_over_fast": med["eager"] / med["fast"],
        "plain_over_fast_paired": [statistics.median(paired), min(paired), max(paired)],
        "plain_over_fast_cpu_paired": [statistics.median(paired_cpu), min(paired_cpu), max(paired_cpu)],
        "plain_over_fast_best": min(ms["plain"]) / min(ms["fast"]),
        "cpu_ms_per_step": cpu_ms,
        "plain_over_fast_spread": [
            min(p / f for p in ms["plain"] for f in ms["fast"]),
            max(p / f for p in ms["plain"] for f in ms["fast"]),
        ],
        **limit,
        "gemm_ms_per_step": gemm_ms,
        "fast_over_arithmetic_limit": med["fast"] / gemm_ms,
        "plain_over_arithmetic_limit": med["plain"] / gemm_ms,
        # in CPU time: the most any bit-exact step on these GEMM kernels could gain over the plain loop
        "plain_over_arithmetic_limit_cpu": statistics.median(cpu_ms["plain"])
        / (1000 * limit["gemm_cpu_seconds_per_step"]),
        "fast_over_arithmetic_limit_cpu": statistics.median(cpu_ms["fast"])
        / (1000 * limit["gemm_cpu_seconds_per_step"]),
        "repeats": repeats,
    }


def main() -> None:
    import json
    import os

    for name in WORKLOADS:
        r = run(name, int(os.environ.get("REPEATS", "3")))
        print(name, json.dumps({k: v for k, v in r.items() if k != "workload"}, default=float))


if __name__ == "__main__":
    main()
