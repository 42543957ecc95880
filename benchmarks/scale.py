"""How sisa's cost grows with N (rows) and S (shards) on this machine: training wall time, deletion wall
time, checkpoint storage, and the driver's memory when fitting from Parquet.

    python benchmarks/scale.py            # the full grid, a few minutes on 2 cores
    python benchmarks/scale.py --quick    # a smoke run in well under a minute

Writes benchmarks/out/scale.json and benchmarks/out/scale.png (``--out`` to change), and with ``--docs``
copies the figure to docs/scale.png for the README. Training runs on a local Ray with the warm worker pool
(``--cpus`` workers at once); MLflow tracking is off, so the figures are sisa's own cost. Each deletion is
one request for one uniformly drawn training row; its analytic cost comes from the receipt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def config(shards: int, slices: int, epochs: int, cpus: int) -> dict:
    return {
        "name": f"scale-s{shards}",
        "seed": 0,
        "sharding": {"shards": shards, "slices": slices},
        "model": {"name": "mlp", "kwargs": {"hidden": [64]}},
        "training": {"epochs": epochs, "batch_size": 128, "lr": 0.003},
        "resources": {"num_cpus": 1},
        "cluster": {"executor": "ray", "num_cpus": cpus},
        "tracking": {"enabled": False},
    }


def data(n: int, features: int = 20, seed: int = 0):
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=n, n_features=features, n_informative=10, n_redundant=0, n_classes=4, random_state=seed
    )
    return X.astype(np.float32), y, np.arange(n)


def store_bytes(ens, prefix: str) -> int:
    st = ens.storage()
    return sum(os.path.getsize(st.path(f)) for f in st.listdir(prefix))


def train_and_delete(ns, shards_list, slices, epochs, deletions, cpus, tmp: Path) -> list[dict]:
    from sisa import SisaEnsemble, costmodel

    X, y, ids = data(max(ns))
    # warm-up: start Ray and the worker pool, so the first measured fit does not pay for them
    with SisaEnsemble.from_config(config(cpus, slices, 1, cpus), tmp / "warm") as ens:
        ens.fit(X[:400], y[:400], ids=ids[:400])
    rows = []
    rng = np.random.default_rng(0)
    for n in ns:
        for S in shards_list:
            wd = tmp / f"n{n}-s{S}"
            ens = SisaEnsemble.from_config(config(S, slices, epochs, cpus), wd)
            t0 = time.perf_counter()
            ens.fit(X[:n], y[:n], ids=ids[:n])
            train_s = time.perf_counter() - t0
            sizes = ens.manifest.slice_rows()
            eps = ens.config.epochs_per_stage()
            row = {
                "N": n,
                "S": S,
                "R": slices,
                "epochs_per_stage": list(eps),
                "train_seconds": train_s,
                "train_sample_epochs": costmodel.full_cost(sizes, eps),
                "checkpoint_bytes": store_bytes(ens, "ckpt"),
                "checkpoints": sum(len(sh.checkpoints) for sh in ens.manifest.shards),
                "slice_bytes": store_bytes(ens, "data"),
                "expected_delete_sample_epochs": costmodel.expected_single(sizes, eps),
                "deletions": [],
            }
            for i in rng.choice(n, size=deletions, replace=False):
                t0 = time.perf_counter()
                receipt = ens.delete([int(ids[i])])
                row["deletions"].append(
                    {
                        "seconds": time.perf_counter() - t0,
                        "sample_epochs": receipt.cost["sample_epochs"],
                        "from_stage": next(iter(receipt.shards.values()))["from_stage"],
                    }
                )
            row["delete_seconds_mean"] = float(np.mean([d["seconds"] for d in row["deletions"]]))
            ens.close()
            shutil.rmtree(wd, ignore_errors=True)
            rows.append(row)
            print(
                f"N={n:6d} S={S:2d}: train {train_s:6.2f}s  delete {row['delete_seconds_mean']:5.2f}s  "
                f"ckpt {row['checkpoint_bytes'] / 1e6:6.2f} MB",
                flush=True,
            )
    return rows


def ingest_memory(ns, features, shards, slices, tmp: Path) -> list[dict]:
    """Peak memory (numpy/Python allocations plus Arrow's pool) of partitioning a Parquet file out of
    core, against the dataset's size: what the driver holds when `fit` streams from Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards.ingest import ingest_parquet
    from shards.storage import Storage

    out = []
    for n in [2000, *ns]:  # the first, small run only warms up (imports, thread pools)
        X, y, ids = data(n, features)
        src = tmp / f"ingest-{n}.parquet"
        pq.write_table(
            pa.table({"id": ids, "label": y, **{f"f{k}": X[:, k] for k in range(features)}}), src, row_group_size=16384
        )
        dataset = X.nbytes
        del X, y, ids
        pool = pa.default_memory_pool()
        base_arrow = pool.bytes_allocated()
        peak_arrow = [0]
        stop = threading.Event()

        def watch(pool=pool, base=base_arrow, peak=peak_arrow, stop=stop):
            while not stop.is_set():
                peak[0] = max(peak[0], pool.bytes_allocated() - base)
                time.sleep(0.002)

        w = threading.Thread(target=watch, daemon=True)
        w.start()
        tracemalloc.start()
        t0 = time.perf_counter()
        ingest_parquet(
            str(src), Storage(str(tmp / f"ingest-store-{n}")), seed=0, shards=shards, slices=slices, spill_dir=str(tmp)
        )
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        stop.set()
        w.join()
        shutil.rmtree(tmp / f"ingest-store-{n}", ignore_errors=True)
        src.unlink()
        if n == 2000:
            continue
        row = {
            "N": n,
            "features": features,
            "S": shards,
            "R": slices,
            "dataset_bytes": dataset,
            "peak_bytes": peak + peak_arrow[0],
            "largest_slice_bytes": dataset // (shards * slices),
            "seconds": seconds,
        }
        out.append(row)
        print(
            f"ingest N={n:7d}: dataset {dataset / 1e6:7.1f} MB, driver peak {row['peak_bytes'] / 1e6:6.1f} MB, "
            f"{seconds:5.1f}s",
            flush=True,
        )
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, mem = result["train_delete"], result["ingest"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for S in sorted({r["S"] for r in rows}):
        rs = sorted((r for r in rows if r["S"] == S), key=lambda r: r["N"])
        ns = [r["N"] for r in rs]
        ax[0].plot(ns, [r["train_seconds"] for r in rs], "o-", label=f"S={S}")
        ax[1].plot(ns, [r["delete_seconds_mean"] for r in rs], "o-", label=f"S={S}")
    R, cpus = rows[0]["R"], result["cpus"]
    ax[0].set(xlabel="training rows N", ylabel="seconds", title=f"fit wall time (R={R}, {cpus} Ray workers)")
    ax[1].set(xlabel="training rows N", ylabel="seconds", title="one deletion, wall time (mean)")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for a in ax[:2]:
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xticks(sorted({r["N"] for r in rows}))
        a.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        for axis in (a.xaxis, a.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        a.legend()
        a.grid(alpha=0.3, which="both")
    ax[2].plot([m["dataset_bytes"] / 1e6 for m in mem], [m["peak_bytes"] / 1e6 for m in mem], "o-", label="driver peak")
    ax[2].plot(
        [m["dataset_bytes"] / 1e6 for m in mem], [m["dataset_bytes"] / 1e6 for m in mem], "--", label="dataset size"
    )
    S, R = mem[0]["S"], mem[0]["R"]
    ax[2].set(
        xlabel="dataset MB (float32 features)", ylabel="MB", title=f"fit from Parquet: driver memory (S x R = {S * R})"
    )
    ax[2].legend()
    ax[2].grid(alpha=0.3)
    fig.suptitle(f"sisa scale on {result['machine']['cpus']} CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small grid, for a smoke run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--docs", action="store_true", help="also copy the figure to docs/scale.png")
    ap.add_argument("--cpus", type=int, default=min(2, os.cpu_count() or 1), help="Ray workers (CPUs) to use")
    args = ap.parse_args(argv)
    if args.quick:
        ns, shards, slices, epochs, dels = [1000, 3000], [1, 2], 2, 2, 1
        ingest_ns, features = [20_000, 40_000], 50
    else:
        ns, shards, slices, epochs, dels = [4000, 16000, 64000, 256000], [1, 2, 4, 8], 4, 8, 3
        ingest_ns, features = [50_000, 100_000, 200_000, 400_000], 100
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="sisa-scale-") as tmp:
        result = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "loadavg_start": os.getloadavg(),
            },
            "cpus": args.cpus,
            "train_delete": train_and_delete(ns, shards, slices, epochs, dels, args.cpus, Path(tmp)),
            "ingest": ingest_memory(ingest_ns, features, 4, 4, Path(tmp)),
        }
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = time.time() - t0
    (out / "scale.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "scale.png")
    if args.docs:
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(out / "scale.png", ROOT / "docs" / "scale.png")
    print(f"wrote {out / 'scale.json'} and {out / 'scale.png'} in {result['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
