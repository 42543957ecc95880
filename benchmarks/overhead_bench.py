"""A deletion's fixed costs, by phase, against its own retraining compute, in the regime where they matter:
the timing workload with S=64 shards (a one-row deletion retrains about an eighth of what it does at S=8).

Two moments (`sisa.ops.purge`): *effective* (the retrained models serve, the store holds no erased byte)
and *done* (re-evaluation, MLflow run, publish and purge of superseded versions). For each deletion the
receipt's ``timing`` gives the wall time to each moment and ``phase_seconds`` (`sisa.ops.phases`); the
retraining compute is the workers' ``seconds`` inside Lightning's fit. Fixed cost = wall time to the moment
minus that compute; every figure is also reported as a fraction of it.

Runs: tracking off, ``wait="done"``; tracking on, ``wait="done"`` (after one warm-up deletion that creates
the MLflow store); tracking on, a queue of ``wait="effective"`` deletions settled in one batch.

    python -m benchmarks.overhead_bench [--size full|quick|smoke] [--repeats N] [--queue Q] [--out DIR]

``--queue``: the length of the settled queue (default: ``--repeats``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the benchmark's own local Ray only
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from benchmarks.common import StageLog, init_ray  # noqa: E402
from benchmarks.workloads import ROOT, SIZES, make_data, sisa_config  # noqa: E402
from shards.store import read_slice  # noqa: E402
from sisa import SisaEnsemble  # noqa: E402

SHARDS = 64
SMOKE_SHARDS = 4  # the smoke size (1,200 rows) checks the wiring only


def _one(ens: SisaEnsemble, rng, wait: str = "done") -> dict:
    S, R = len(ens.manifest.shards), ens.config.sharding.slices
    s, j = int(rng.integers(S)), int(rng.integers(R))
    rows = read_slice(ens.storage(), ens.manifest.shards[s].slices[j].to_dict())
    log = StageLog()
    t0 = time.perf_counter()
    r = ens.delete([int(rng.choice(rows["id"]))], progress=log, wait=wait)
    wall = time.perf_counter() - t0
    t = r.timing
    compute = log.train_seconds
    out = {
        "slice": j + 1,
        "retrain_compute_seconds": compute,
        "wall_seconds": wall,
        "seconds_to_effective": t["seconds_to_effective"],
        "fixed_to_effective": t["seconds_to_effective"] - compute,
        "phase_seconds": t["phase_seconds"],
    }
    if "seconds_to_done" in t:
        out["seconds_to_done"] = t["seconds_to_done"]
        out["fixed_to_done"] = t["seconds_to_done"] - compute
        out["fixed_to_logged"] = t.get("seconds_to_logged", t["seconds_to_done"]) - compute  # the run, behind done
    return out


def _spread(xs: list[float]) -> dict:
    return {
        "median": statistics.median(xs),
        "min": min(xs),
        "max": max(xs),
        "mean": statistics.fmean(xs),
        "n": len(xs),
    }


def summarise(runs: list[dict]) -> dict:
    """Fixed costs as fractions of each deletion's own retraining compute, with their spread over runs."""
    out: dict = {"runs": runs}
    frac = {"fixed_to_effective": [r["fixed_to_effective"] / r["retrain_compute_seconds"] for r in runs]}
    if all("fixed_to_done" in r for r in runs):
        for key in ("fixed_to_done", "fixed_to_logged"):
            frac[key] = [r[key] / r["retrain_compute_seconds"] for r in runs]
            out[f"{key}_seconds"] = _spread([r[key] for r in runs])
    out["fixed_to_effective_seconds"] = _spread([r["fixed_to_effective"] for r in runs])
    out["retrain_compute_seconds"] = _spread([r["retrain_compute_seconds"] for r in runs])
    out["fraction_of_compute"] = {k: _spread(v) for k, v in frac.items()}
    phases = sorted({p for r in runs for p in r["phase_seconds"]})
    out["phase_fraction_of_compute"] = {
        p: statistics.median([r["phase_seconds"].get(p, 0.0) / r["retrain_compute_seconds"] for r in runs])
        for p in phases
    }
    out["phase_seconds_median"] = {p: statistics.median([r["phase_seconds"].get(p, 0.0) for r in runs]) for p in phases}
    return out


def _settle(ens: SisaEnsemble) -> tuple[list, float, float]:
    """`SisaEnsemble.settle`, timed: (the requests done, seconds to their *done* moment, seconds to the end
    of the bookkeeping behind it: the evaluation and the batch's run)."""
    from sisa.ops.phases import Phases
    from sisa.ops.purge import settle

    ph = Phases()
    with ens.workdir.lock(what="settle"):
        settled = settle(ens._ctx, ph)
    return settled, ph.moments["done"], time.perf_counter() - ph.t0


def _tracking(workdir: Path, on: bool) -> None:
    p = workdir / "config.yaml"
    cfg = yaml.safe_load(p.read_text())
    cfg["tracking"] = {**cfg.get("tracking", {}), "enabled": on}
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))


def run(size_name: str = "full", out: Path | None = None, repeats: int = 4, log=print, queue_length: int | None = None) -> dict:
    size = SIZES[size_name]
    out = Path(out or ROOT / "benchmarks" / "out")
    wd = out / "work" / "overhead"
    import shutil

    shutil.rmtree(wd, ignore_errors=True)
    init_ray(2)
    import torch

    torch.set_num_threads(1)
    (X, y, ids), (Xe, ye) = make_data(size)
    shards = SMOKE_SHARDS if size_name == "smoke" else SHARDS
    cfg = sisa_config(size, 1, shards=shards)
    t0 = time.perf_counter()
    ens = SisaEnsemble.from_config(cfg, wd).fit(X, y, ids=ids, eval_set=(Xe, ye, np.arange(-len(ye), 0)))
    log(f"[overhead] fit S={shards}: {time.perf_counter() - t0:.1f} s; load {os.getloadavg()}")
    rng = np.random.default_rng(7)
    res: dict = {"size": size_name, "shards": shards, "load_before": os.getloadavg()}
    res["tracking_off"] = summarise([_one(ens, rng) for _ in range(repeats)])
    ens.close()
    _tracking(wd, True)
    ens = SisaEnsemble.open(wd)
    res["first_tracked"] = _one(ens, rng)  # creates the MLflow store and registered model
    res["tracking_on"] = summarise([_one(ens, rng) for _ in range(repeats)])
    queue = [_one(ens, rng, wait="effective") for _ in range(queue_length or repeats)]
    settled, to_done, batch = _settle(ens)
    res["queue"] = summarise(queue)
    compute = sum(r["retrain_compute_seconds"] for r in queue)
    effective = sum(r["fixed_to_effective"] for r in queue)
    res["queue"].update(
        settled=len(settled),
        settle_seconds=batch,
        settle_to_done_seconds=to_done,
        fixed_to_done_per_request=(effective + to_done) / len(queue),
        fixed_to_done_fraction_of_compute=(effective + to_done) / compute,
        fixed_to_logged_per_request=(effective + batch) / len(queue),
        fixed_to_logged_fraction_of_compute=(effective + batch) / compute,
    )
    ens.close()
    res["load_after"] = os.getloadavg()
    (out / "overhead.json").write_text(json.dumps(res, indent=1))
    (out / "overhead.md").write_text(table(res))
    return res


def table(res: dict) -> str:
    """The report: fixed costs to effective and to done, as fractions of the retraining compute."""
    lines = [
        f"Fixed costs of a one-row deletion, S={res['shards']} ({res['size']} workload), median [min, max] "
        f"over runs; load average {res['load_before'][0]:.1f} before, {res['load_after'][0]:.1f} after.",
        "",
        "| run | retrain compute (s) | fixed to effective (s) | / compute | fixed to done (s) | / compute | "
        "to the run logged (s) | / compute |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(d, k="median"):
        return f"{d[k]:.3f} [{d['min']:.3f}, {d['max']:.3f}]"

    for name in ("tracking_off", "tracking_on", "queue"):
        s = res[name]
        f = s["fraction_of_compute"]
        done = cell(s["fixed_to_done_seconds"]) if "fixed_to_done_seconds" in s else "-"
        fdone = cell(f["fixed_to_done"]) if "fixed_to_done" in f else "-"
        logged = cell(s["fixed_to_logged_seconds"]) if "fixed_to_logged_seconds" in s else "-"
        flogged = cell(f["fixed_to_logged"]) if "fixed_to_logged" in f else "-"
        if name == "queue":
            done = f"{s['fixed_to_done_per_request']:.3f} per request (batch settle: done {s['settle_to_done_seconds']:.3f} s)"
            fdone = f"{s['fixed_to_done_fraction_of_compute']:.3f}"
            logged = f"{s['fixed_to_logged_per_request']:.3f} per request (batch settle {s['settle_seconds']:.3f} s)"
            flogged = f"{s['fixed_to_logged_fraction_of_compute']:.3f}"
        lines.append(
            f"| {name} | {cell(s['retrain_compute_seconds'])} | {cell(s['fixed_to_effective_seconds'])} | "
            f"{cell(f['fixed_to_effective'])} | {done} | {fdone} | {logged} | {flogged} |"
        )
    lines += ["", "| phase | tracking off: s (/ compute) | tracking on: s (/ compute) |", "|---|---|---|"]
    off, on = res["tracking_off"], res["tracking_on"]
    for p in sorted(set(off["phase_seconds_median"]) | set(on["phase_seconds_median"])):
        a = f"{off['phase_seconds_median'].get(p, 0):.4f} ({off['phase_fraction_of_compute'].get(p, 0):.3f})"
        b = f"{on['phase_seconds_median'].get(p, 0):.4f} ({on['phase_fraction_of_compute'].get(p, 0):.3f})"
        lines.append(f"| {p} | {a} | {b} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="full", choices=sorted(SIZES))
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--queue", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    print(table(run(a.size, Path(a.out) if a.out else None, a.repeats, queue_length=a.queue)))
