"""The training step against the plain loop and the arithmetic limit: ``python -m benchmarks.engine_bench``.

For one MLP, optimizer and batch size, on one thread in this process, the same sample-epochs:
  - the plain torch loop (`benchmarks.plain_loop.train_shard`: eager autograd, torch's Adam);
  - sisa's stage training (`shards.training.run_stage`: the direct loop of `shards.loop`, the sampler,
    metrics) with
    ``training.engine: eager`` and with ``fast`` (`shards.fast`);
  - the arithmetic limit: the step's GEMMs alone (forward, weight and input gradients, the model's own
    shapes), timed back to back; their FLOPs over that time is the measured sgemm rate;
  - ``training.precision: bf16-mixed`` (bf16 GEMMs, fp32 master weights: other bits): the fast engine's
    bf16 step, the plain loop under ``torch.autocast(cpu, bfloat16)``, and the arithmetic limit of the
    same GEMMs in bf16 (the measured bf16 GEMM rate).
Each is run ``repeats`` times interleaved; the ratios use medians, the spread is min..max over all
pairings; ``paired`` is each repeat's plain over fast (run back to back: the same machine load), in
wall and in this thread's CPU time (far less sensitive to other jobs), median [min, max]; the bf16 ratios
are paired the same way (each repeat runs every kind once).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from benchmarks import plain_loop
from shards import training
from shards.models import MLP
from shards.spec import BF16_MIXED, FP32, TrainSpec

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


KINDS = ("plain", "eager", "fast", "plain_bf16", "fast_bf16")


def _framework(w: dict, rows, engine: str, precision: str = FP32) -> tuple[float, float]:
    spec = TrainSpec(
        seed=0,
        model="mlp",
        model_kwargs={"hidden": list(w["hidden"])},
        optim={"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.0, "lr_gamma": 1.0},
        epochs_per_stage=(w["epochs"],),
        batch_size=w["batch"],
        input_shape=(w["features"],),
        num_classes=w["classes"],
        extra={"engine": engine, "precision": precision},
    )
    t0, c0 = time.perf_counter(), time.thread_time()
    _, metrics = training.run_stage(spec, 0, 1, None, rows, "bench")
    assert metrics["engine"] == engine
    return time.perf_counter() - t0, time.thread_time() - c0


def _plain(w: dict, rows, bf16: bool = False) -> tuple[float, float]:
    X, y = torch.from_numpy(np.ascontiguousarray(rows["x"])), torch.from_numpy(np.ascontiguousarray(rows["y"]))
    torch.manual_seed(0)
    t0, c0 = time.perf_counter(), time.thread_time()
    plain_loop.train_shard(
        [(X, y, w["epochs"])], lambda: MLP((w["features"],), w["classes"], hidden=w["hidden"]), 1e-3, w["batch"], bf16
    )
    return time.perf_counter() - t0, time.thread_time() - c0


def gemm_limit(w: dict, reps: int = 300, dtype=torch.float32) -> dict:
    """Seconds per step of the step's GEMMs alone, and the rate they run at (FLOP/s), in ``dtype``."""
    widths = [w["features"], *w["hidden"], w["classes"]]
    B = w["batch"]
    shapes, flops = [], 0
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        x, W, g = torch.randn(B, a, dtype=dtype), torch.randn(b, a, dtype=dtype), torch.randn(B, b, dtype=dtype)
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


def _runs(w: dict, rows, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, thread CPU) seconds of each kind, ``repeats`` times interleaved, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for precision in (FP32, BF16_MIXED):  # imports and first-call costs
            _framework({**w, "epochs": 1}, rows[: w["batch"] * 4], "fast", precision)
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}
        for _ in range(repeats):
            runs["plain"].append(_plain(w, rows))
            runs["eager"].append(_framework(w, rows, "eager"))
            runs["fast"].append(_framework(w, rows, "fast"))
            runs["plain_bf16"].append(_plain(w, rows, bf16=True))
            runs["fast_bf16"].append(_framework(w, rows, "fast", BF16_MIXED))
        limits = gemm_limit(w), gemm_limit(w, dtype=torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    return runs, limits


def _paired(a: list[float], b: list[float]) -> list[float]:
    """Per repeat a / b (run in the same repeat: the same machine load): median, min, max."""
    r = [x / y for x, y in zip(a, b)]
    return [statistics.median(r), min(r), max(r)]


def run(name: str, repeats: int = 3) -> dict:
    w = WORKLOADS[name]
    steps = w["epochs"] * -(-w["rows"] // w["batch"])
    runs, (limit, limit16) = _runs(w, _data(w), repeats)
    ms = {k: [1000 * wall / steps for wall, _ in v] for k, v in runs.items()}
    cpu_ms = {k: [1000 * cpu / steps for _, cpu in v] for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in ms.items()}
    gemm_ms = 1000 * limit["gemm_seconds_per_step"]
    return {
        "workload": {**w, "hidden": list(w["hidden"]), "steps": steps, "optimizer": "adam", "threads": 1},
        "ms_per_step": ms,
        "median_ms_per_step": med,
        "plain_over_fast": med["plain"] / med["fast"],
        "plain_over_eager": med["plain"] / med["eager"],
        "eager_over_fast": med["eager"] / med["fast"],
        "plain_over_fast_paired": _paired(ms["plain"], ms["fast"]),
        "plain_over_fast_cpu_paired": _paired(cpu_ms["plain"], cpu_ms["fast"]),
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
        **_bf16(ms, cpu_ms, med, limit16, gemm_ms),
        "repeats": repeats,
    }


def _bf16(ms: dict, cpu_ms: dict, med: dict, limit16: dict, gemm_ms: float) -> dict:
    """The bf16-mixed figures: the fast bf16 step against the fp32 plain loop and the autocast one, and
    against the limit of its GEMMs in bf16 (measured here, beside the fp32 rate)."""
    gemm16_ms = 1000 * limit16["gemm_seconds_per_step"]
    return {
        "plain_over_fast_bf16": med["plain"] / med["fast_bf16"],
        "plain_over_fast_bf16_paired": _paired(ms["plain"], ms["fast_bf16"]),
        "plain_over_fast_bf16_cpu_paired": _paired(cpu_ms["plain"], cpu_ms["fast_bf16"]),
        "plain_bf16_over_fast_bf16": med["plain_bf16"] / med["fast_bf16"],
        "plain_bf16_over_fast_bf16_paired": _paired(ms["plain_bf16"], ms["fast_bf16"]),
        "plain_over_plain_bf16": med["plain"] / med["plain_bf16"],
        "bf16_gemm_ms_per_step": gemm16_ms,
        "bf16_gemm_gflops": limit16["sgemm_gflops"],
        "bf16_gemm_gflops_cpu": limit16["sgemm_gflops_cpu"],
        "fp32_over_bf16_gemm": gemm_ms / gemm16_ms,
        "fast_bf16_over_bf16_limit": med["fast_bf16"] / gemm16_ms,
        "plain_over_bf16_limit": med["plain"] / gemm16_ms,
    }


def main() -> None:
    import json
    import os

    for name in WORKLOADS:
        r = run(name, int(os.environ.get("REPEATS", "3")))
        print(name, json.dumps({k: v for k, v in r.items() if k != "workload"}, default=float))


if __name__ == "__main__":
    main()
