"""The fixed cost per stage (issue 14, item 4): a fit at S x R = 256 against one at S x R = 16, on the
same rows and epochs: ``python -m benchmarks.stage_overhead_bench [--repeats N] [--executor inprocess|ray]``.

The pairs keep R and the schedule and change S only, so every row is trained for the same sample-epochs
in both fits (S=16, R=1 against S=256, R=1; S=4, R=4 against S=64, R=4). The workload is the synthetic
config's (20 features, an MLP 128-128, batch 64, e=10, the paper schedule) on 16,384 training rows,
tracking off, the fast engine. Each fit runs in a fresh workdir; the pair is interleaved ``repeats``
times after one warm-up fit; the ratio is of medians, its spread min..max over all pairings. Per fit the
stages' own compute (``seconds``: the training loop and the accuracy pass) and checkpoint I/O
(``io_seconds``) are summed, and the rest of the wall time (partition, slice writes, manifest) is
reported beside them. Then one-row deletions at S=8, R=4 on the same rows (`deletions`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the benchmark's own local Ray only
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.common import StageLog, init_ray  # noqa: E402
from sisa import SisaEnsemble  # noqa: E402

ROWS = 16_384
PRECISIONS = ("32-true", "bf16-mixed")
PAIRS = ((16, 1, 256, 1), (4, 4, 64, 4))  # (S, R) at S x R = 16, then at S x R = 256


def _data(rows: int):
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=rows, n_features=20, n_informative=10, n_classes=4, flip_y=0.02, random_state=0
    )
    return X.astype(np.float32), y, np.arange(rows)


def _config(shards: int, slices: int, executor: str, precision: str = "32-true") -> dict:
    return {
        "name": "stage-overhead",
        "seed": 0,
        "sharding": {"shards": shards, "slices": slices},
        "model": {"name": "mlp", "kwargs": {"hidden": [128, 128]}},
        "training": {
            "epochs": 10,
            "schedule": "paper",
            "batch_size": 64,
            "lr": 0.002,
            "engine": "fast",
            "precision": precision,
        },
        "tracking": {"enabled": False},
        "cluster": {"executor": executor},
    }


def fit_once(shards: int, slices: int, data, executor: str = "inprocess") -> dict:
    """One fit in a fresh workdir: wall seconds, the stages' compute and checkpoint I/O, and the rest."""
    X, y, ids = data
    log = StageLog()
    with tempfile.TemporaryDirectory(prefix="sisa-stage-bench-") as d:
        ens = SisaEnsemble.from_config(_config(shards, slices, executor), Path(d) / "w")
        t0, c0 = time.perf_counter(), time.process_time()
        ens.fit(X, y, ids=ids, progress=log)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        ens.close()
    io = sum(m.get("io_seconds", 0.0) for m in log.stages)
    return {
        "wall_seconds": wall,
        "cpu_seconds": cpu,  # this process (the in-process executor trains here): far less load-sensitive
        "stage_compute_seconds": log.train_seconds,
        "stage_io_seconds": io,
        "other_seconds": wall - log.train_seconds - io,
        "stages": len(log.stages),
        "sample_epochs": log.sample_epochs,
    }


def run(repeats: int = 3, executor: str = "inprocess", rows: int = ROWS) -> dict:
    data = _data(rows)
    fit_once(4, 1, (data[0][:2048], data[1][:2048], data[2][:2048]), executor)  # imports, workers, first calls
    out = {}
    for s1, r1, s2, r2 in PAIRS:
        small, large = [], []
        for _ in range(repeats):
            small.append(fit_once(s1, r1, data, executor))
            large.append(fit_once(s2, r2, data, executor))
        ws, wl = [f["wall_seconds"] for f in small], [f["wall_seconds"] for f in large]
        cs, cl = [f["cpu_seconds"] for f in small], [f["cpu_seconds"] for f in large]
        key = f"S{s1}xR{r1}_vs_S{s2}xR{r2}"
        out[key] = {
            "ratio": statistics.median(wl) / statistics.median(ws),
            "ratio_spread": [min(b / a for a in ws for b in wl), max(b / a for a in ws for b in wl)],
            "cpu_ratio": statistics.median(cl) / statistics.median(cs),
            "cpu_ratio_spread": [min(b / a for a in cs for b in cl), max(b / a for a in cs for b in cl)],
            # the extra wall time per extra stage: the fixed cost of a stage at this size
            "fixed_ms_per_stage": 1000
            * (statistics.median(wl) - statistics.median(ws))
            / (large[0]["stages"] - small[0]["stages"]),
            "fixed_cpu_ms_per_stage": 1000
            * (statistics.median(cl) - statistics.median(cs))
            / (large[0]["stages"] - small[0]["stages"]),
            "small": _median(small),
            "large": _median(large),
        }
        assert small[0]["sample_epochs"] == large[0]["sample_epochs"], "the pair must train the same sample-epochs"
    return {"rows": rows, "executor": executor, "repeats": repeats, "pairs": out, "deletion": deletions(data, executor)}


def deletions(data, executor: str = "inprocess", rounds: int = 2, precision: str = "32-true") -> dict:
    """One-row deletions at S=8, R=4 on the same workload: one row from each slice position j (a different
    shard each), ``rounds`` times; E[T] = sum_j w_j T_j (w_j: the share of rows in position j), the fit's
    wall time over E[T], and that over the analytic bound (`sisa.costmodel.expected_speedup`).
    ``precision``: ``training.precision`` of the fit and its deletions."""
    from shards.store import read_slice
    from sisa import costmodel

    X, y, ids = data
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="sisa-stage-bench-") as d:
        ens = SisaEnsemble.from_config(_config(8, 4, executor, precision), Path(d) / "w")
        t0 = time.perf_counter()
        ens.fit(X, y, ids=ids)
        fit = time.perf_counter() - t0
        rows, epochs = ens.manifest.slice_rows(), ens.config.epochs_per_stage()
        walls: list[list[float]] = [[] for _ in range(4)]
        for r in range(rounds):
            for j in range(4):
                shard = (j + 4 * r) % 8
                part = read_slice(ens.storage(), ens.manifest.shards[shard].slices[j].to_dict())
                t0 = time.perf_counter()
                ens.delete([int(rng.choice(part["id"]))])
                walls[j].append(time.perf_counter() - t0)
        ens.close()
    share = [sum(sh[j] for sh in rows) / sum(map(sum, rows)) for j in range(4)]
    expected = sum(w * statistics.mean(t) for w, t in zip(share, walls))
    bound = costmodel.expected_speedup(rows, epochs)
    return {
        "precision": precision,
        "fit_seconds": fit,
        "expected_deletion_seconds": expected,
        "deletion_seconds_by_slice": [statistics.mean(t) for t in walls],
        "speedup": fit / expected,
        "bound": bound,
        "speedup_over_bound": fit / expected / bound,
    }


def _median(fits: list[dict]) -> dict:
    return {k: statistics.median(f[k] for f in fits) for k in fits[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--executor", choices=["inprocess", "ray"], default="inprocess")
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument(
        "--deletions",
        action="store_true",
        help="only the one-row deletions, under 32-true then bf16-mixed, --repeats times",
    )
    args = ap.parse_args()
    started = args.executor == "ray" and init_ray()
    try:
        if args.deletions:
            data = _data(args.rows)
            out = [deletions(data, args.executor, precision=p) for _ in range(args.repeats) for p in PRECISIONS]
            print(json.dumps(out, indent=1))
            return
        print(json.dumps(run(args.repeats, args.executor, args.rows), indent=1))
    finally:
        if started:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    main()
