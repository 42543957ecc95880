"""Parquet ingest on Ray (`orchestration.ingest`, Ray Data): throughput with 1 and 2 Ray workers, the
driver's peak RSS and disk writes, and the ingest workers' peak RSS against the slice size, on local disk
and on a local S3 endpoint (moto's server).

    python -m benchmarks.ingest_bench --rows 1000000         # about 100 MB of features + ids
    python -m benchmarks.ingest_bench --quick                 # a smoke run

Each configuration runs in its own driver process (a fresh local Ray with ``num_cpus`` = the workers),
alternating 1 and 2 workers ``--reps`` times, so every ratio compares runs of the same moment. Workers log
their peak RSS through a Ray worker setup hook (`setup`). Writes benchmarks/out/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
S, R = 4, 4


_ANON = [0]  # the largest private (anonymous) RSS sampled in this worker: without the object store's shared pages


def _sample_anon() -> None:
    while True:
        with open("/proc/self/status") as f:
            now = next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
        _ANON[0] = max(_ANON[0], now)
        time.sleep(0.005)


def setup():
    """Ray worker setup hook: after each ingest task, append this worker's peak private RSS (bytes, sampled
    every 5 ms) and CPU seconds to a log."""
    import threading

    import orchestration.ingest as ingest

    threading.Thread(target=_sample_anon, daemon=True).start()

    for name in ("_place_unit", "_write_group"):
        fn = getattr(ingest, name)

        def logged(batch, job, fn=fn, name=name):
            out = fn(batch, job)
            use = resource.getrusage(resource.RUSAGE_SELF)
            with open(os.environ["SISA_BENCH_LOG"], "a") as f:
                f.write(f"{name} {os.getpid()} {_ANON[0]} {use.ru_utime + use.ru_stime}\n")
            return out

        setattr(ingest, name, logged)


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _io_written() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["write_bytes"])


def child(args) -> None:
    """One ingest in this process; prints a JSON line."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from orchestration.ingest import ray_ingest
    from shards.storage import Storage

    log = Path(args.log)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "SISA_BENCH_LOG": str(log)}
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "benchmarks.ingest_bench.setup"})  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    options = json.loads(args.options)
    rss0 = peak_rss()
    w0, t0 = _io_written(), time.perf_counter()
    ray_ingest(args.source, Storage(args.store, options), seed=0, shards=S, slices=R, options=options)
    seconds, written = time.perf_counter() - t0, _io_written() - w0
    rss = peak_rss()
    workers = [ln.split() for ln in log.read_text().splitlines()] if log.exists() else []
    peak = {k: max([int(w[2]) for w in workers if w[0] == k] or [0]) for k in ("_place_unit", "_write_group")}
    cpu: dict[str, float] = {}  # per worker process: its CPU seconds after its last task
    for w in workers:
        cpu[w[1]] = max(cpu.get(w[1], 0.0), float(w[3]))
    print("RESULT " + json.dumps({"seconds": seconds, "driver_disk_written": written, "driver_rss_before": rss0,
                                  "driver_peak_rss": rss, "place_worker_peak_private_rss": peak["_place_unit"],
                                  "group_worker_peak_private_rss": peak["_write_group"],
                                  "worker_cpu_seconds": sum(cpu.values())}))  # fmt: skip
    ray.shutdown()


def make_dataset(rows: int, features: int, where: Path, files: int = 8) -> int:
    """Parquet files of ``rows`` rows (int ids, float32 features); returns the bytes of ids + labels + features."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = -(-rows // files)
    for k in range(files):
        n = min(per, rows - k * per)
        X = rng.standard_normal((n, features), dtype=np.float32)
        cols = {"id": np.arange(k * per, k * per + n), "label": rng.integers(0, 4, n)}
        cols |= {f"f{j}": X[:, j] for j in range(features)}
        pq.write_table(pa.table(cols), where / f"part-{k:02d}.parquet", row_group_size=65536)
    return rows * (8 + 8 + 4 * features)


def run_child(source, store, workers, options, tmp) -> dict:
    log = Path(tempfile.mktemp(dir=tmp, suffix=".log"))
    cmd = [sys.executable, "-m", "benchmarks.ingest_bench", "--child", "--source", source, "--store", store,
           "--workers", str(workers), "--options", json.dumps(options), "--log", str(log)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        raise RuntimeError(res.stdout[-2000:] + res.stderr[-4000:])
    return json.loads(line[0][7:])


def moto_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto server did not start")


def spread(xs: list[float]) -> dict:
    return {"mean": float(np.mean(xs)), "min": float(np.min(xs)), "max": float(np.max(xs)), "runs": xs}


def bench(where: str, source: str, store_root: str, options: dict, dataset: int, reps: int, tmp: Path, wipe) -> dict:
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for rep in range(reps):
        for w in (1, 2):
            store = f"{store_root}/{where}-w{w}-r{rep}"
            runs[w].append(run_child(source, store, w, options, tmp))
            wipe(store)
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(runs[1], runs[2])]
    out = {"where": where, "dataset_bytes": dataset, "speedup_2_over_1": spread(ratios)}
    for w, rs in runs.items():
        out[f"w{w}"] = {"MB_per_s": spread([dataset / r["seconds"] / 1e6 for r in rs]),
                        "worker_cpu_s_per_GB": spread([r["worker_cpu_seconds"] / dataset * 1e9 for r in rs]),
                        **{k: max(r[k] for r in rs) for k in rs[0] if k != "seconds"}}  # fmt: skip
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true")
    p.add_argument("--source"), p.add_argument("--store"), p.add_argument("--log")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--options", default="{}")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--features", type=int, default=20)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-s3", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "ingest.json"))
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    rows = 20_000 if args.quick else args.rows
    tmp = Path(tempfile.mkdtemp(prefix="sisa-ingest-bench-"))
    results = {"rows": rows, "features": args.features, "S": S, "R": R, "cpus": os.cpu_count(),
               "load_before": os.getloadavg()}  # fmt: skip
    try:
        dataset = make_dataset(rows, args.features, tmp / "in")
        small = make_dataset(rows // 4, args.features, tmp / "small")
        results["local"] = bench("local", str(tmp / "in"), str(tmp / "store"), {}, dataset, args.reps, tmp,
                                 lambda s: shutil.rmtree(s, ignore_errors=True))  # fmt: skip
        quarter = run_child(str(tmp / "small"), str(tmp / "store" / "small"), 2, {}, tmp)
        results["driver_rss_quarter_N"] = {"dataset_bytes": small, **quarter}
        if not args.skip_s3:
            results["s3"] = s3_bench(tmp, dataset, args.reps)
        results["load_after"] = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def s3_bench(tmp: Path, dataset: int, reps: int) -> dict:
    import s3fs

    proc, url = moto_endpoint()
    try:
        options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": url}}
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        fs.mkdir("bench")
        fs.put(str(tmp / "in") + "/", "bench/in/", recursive=True)
        return bench("s3", "s3://bench/in", "s3://bench/store", options, dataset, reps, tmp,
                     lambda s: fs.rm(s.removeprefix("s3://"), recursive=True))  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    main()
