"""Deletion-aware placement: expected and measured cost per erasure request for each `sharding.placement`.

A skewed scenario: 10% of the training rows (chosen at random, independent of features and labels) carry a
deletion prior 36 times the others' (0.36 against 0.01), so they produce 80% of the requests. Each
placement (uniform, late_slices, isolated_shards) is fitted on the same rows with the same priors, then
serves K single-row requests drawn from that prior (stratified: exactly 80% of them name a likely row),
then K requests drawn uniformly over the live rows (the wrong prior). For every request: the expected
cost under the request distribution on the partition of that moment (`costmodel.expected_prior`), the
receipt's cost and the workers' own count of the sample-epochs they trained (which must equal it). Also
the analytic figure (`costmodel.expected_placement`, balanced shards) and each placement's test accuracy
against uniform on the same data. In-process, small synthetic data: a few minutes on 2 cores.

``python benchmarks/placement_bench.py [--size full|smoke] [--out DIR]`` writes ``placement_results.json``
and ``placement.png`` into DIR (with ``--size full`` the plot is copied to docs/bench).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.common import StageLog, timed  # noqa: E402
from shards.store import read_slice  # noqa: E402
from sisa import SisaEnsemble, costmodel  # noqa: E402
from sisa.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    "full": {"rows": 6000, "eval_rows": 1500, "shards": 8, "slices": 8, "isolated": 3, "requests": 40, "epochs": 8},
    "smoke": {"rows": 600, "eval_rows": 200, "shards": 4, "slices": 4, "isolated": 1, "requests": 5, "epochs": 4},
}
STRATEGIES = ("uniform", "late_slices", "isolated_shards")
LIKELY_SHARE, REQUEST_SHARE = 0.1, 0.8
HIGH, LOW = 0.36, 0.01  # 0.1 * 0.36 / (0.1 * 0.36 + 0.9 * 0.01) = 0.8 of the requests


def config(size: dict, strategy: str) -> dict:
    sharding = {"shards": size["shards"], "slices": size["slices"]}
    if strategy != "uniform":
        sharding.update(placement=strategy, risk_threshold=0.1)
    if strategy == "isolated_shards":
        sharding["isolated_shards"] = size["isolated"]
    return {
        "name": f"placement-bench-{strategy}",
        "seed": 11,
        "sharding": sharding,
        "model": {"name": "mlp", "kwargs": {"hidden": [64]}},
        "training": {"epochs": size["epochs"], "batch_size": 64, "lr": 3e-3},
        "tracking": {"enabled": False},
        "cluster": {"executor": "inprocess"},
    }


def workload(size: dict, seed: int = 0) -> dict:
    """Rows, priors and the two request sequences (fixed in advance: every placement gets the same)."""
    from sklearn.datasets import make_classification

    n, ne, k = size["rows"], size["eval_rows"], size["requests"]
    X, y = make_classification(
        n_samples=n + ne, n_features=20, n_informative=10, n_classes=4, flip_y=0.02, random_state=seed
    )
    X = X.astype(np.float32)
    ids = np.array([f"user-{i}" for i in range(n + ne)])
    rng = np.random.default_rng(seed)
    likely = np.zeros(n, bool)
    likely[rng.choice(n, int(LIKELY_SHARE * n), replace=False)] = True
    risk = np.where(likely, HIGH, LOW)
    n_hi = round(REQUEST_SHARE * k)
    skewed = list(rng.choice(np.flatnonzero(likely), n_hi, replace=False))
    skewed += list(rng.choice(np.flatnonzero(~likely), k - n_hi, replace=False))
    rng.shuffle(skewed)
    rest = np.setdiff1d(np.arange(n), skewed)
    uniform = list(rng.choice(rest, k, replace=False))
    return {
        "X": X[:n], "y": y[:n], "ids": ids[:n], "risk": risk, "likely": likely,
        "eval": (X[n:], y[n:], ids[n:]),
        "requests": {"skewed": [ids[i] for i in skewed], "uniform": [ids[i] for i in uniform]},
    }  # fmt: skip


def _weights(ens, prior: dict | None) -> list[list[float]]:
    """Each slice's share of the requests: the summed prior of its rows, or its row count (uniform requests)."""
    store, out = ens._ctx.storage(), []
    for sh in ens.manifest.shards:
        row = []
        for e in sh.slices:
            ids = read_slice(store, e.to_dict())["id"].tolist() if prior is not None else ()
            row.append(sum(prior[i] for i in ids) if prior is not None else float(e.rows))
        out.append(row)
    return out


def track(strategy: str, size: dict, w: dict, wd: Path, log=print) -> dict:
    """Fit one placement, then serve both request sequences; every request's expected and measured cost."""
    cfg = config(size, strategy)
    ens, fit_log = SisaEnsemble.from_config(cfg, wd), StageLog()
    risk = w["risk"] if strategy != "uniform" else None
    with timed() as t:
        ens.fit(w["X"], w["y"], ids=w["ids"], eval_set=w["eval"], risk=risk, progress=fit_log)
    eps = ens.config.epochs_per_stage()
    prior = dict(zip(w["ids"].tolist(), w["risk"].tolist()))
    out = {"fit_seconds": t.seconds, "fit_sample_epochs": fit_log.sample_epochs}
    out["accuracy"] = ens.manifest.metrics.get("ensemble_accuracy")
    for scenario in ("skewed", "uniform"):
        steps = []
        for i in w["requests"][scenario]:
            m = ens.manifest
            weights = _weights(ens, prior if scenario == "skewed" else None)
            expected = costmodel.expected_prior(m.slice_rows(), eps, weights)
            plan, stage_log = ens.estimate_deletion_cost([i]), StageLog()
            r = ens.delete([i], progress=stage_log)
            steps.append(
                {
                    "expected": expected,
                    "estimate": plan.sample_epochs,
                    "receipt": r.cost["sample_epochs"],
                    "measured": stage_log.sample_epochs,
                    "likely": bool(prior[i] >= 0.1),
                }
            )
        out[scenario] = steps
        meas = np.array([s["measured"] for s in steps], float)
        log(
            f"[placement] {strategy} {scenario}: measured {meas.mean():.0f} vs expected "
            f"{np.mean([s['expected'] for s in steps]):.0f} sample-epochs per request"
        )
    ens.close()
    return out


def summary(res: dict, size: dict) -> dict:
    n, S, R = size["rows"], size["shards"], size["slices"]
    eps = res["epochs_per_stage"]
    out = {}
    for strategy in STRATEGIES:
        t = res[strategy]
        row = {"accuracy": t["accuracy"], "accuracy_minus_uniform_pp": 100 * (t["accuracy"] - res["uniform"]["accuracy"])}
        for sc, p in (("skewed", REQUEST_SHARE), ("uniform", LIKELY_SHARE)):
            steps = t[sc]
            meas = np.array([s["measured"] for s in steps], float)
            exp = float(np.mean([s["expected"] for s in steps]))
            row[sc] = {
                "expected": exp,
                "measured": float(meas.mean()),
                "measured_standard_error": float(meas.std(ddof=1) / np.sqrt(len(meas))) if len(meas) > 1 else 0.0,
                "measured_over_expected": float(meas.mean()) / exp,
                "analytic": costmodel.expected_placement(strategy, n, S, R, eps, LIKELY_SHARE, p, size["isolated"]),
                "measured_equals_receipt": all(s["measured"] == s["receipt"] == s["estimate"] for s in steps),
            }
        out[strategy] = row
    for strategy in STRATEGIES:
        for sc in ("skewed", "uniform"):
            base = out["uniform"][sc]
            row = out[strategy][sc]
            row["expected_over_uniform"] = row["expected"] / base["expected"]
            row["measured_over_uniform"] = row["measured"] / base["measured"]
    return out


def plot(res: dict) -> bytes:
    """Expected and measured cost per request of each placement, relative to uniform placement's expected."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    s = res["summary"]
    for k, (sc, title) in enumerate((("skewed", "the prior is right (10% of rows: 80% of requests)"),
                                     ("uniform", "the prior is wrong (requests uniform)"))):  # fmt: skip
        ax = fig.add_subplot(1, 2, k + 1)
        base = s["uniform"][sc]["expected"]
        x = np.arange(len(STRATEGIES))
        ax.bar(x - 0.2, [s[p][sc]["expected"] / base for p in STRATEGIES], 0.4, label="expected")
        ax.bar(
            x + 0.2,
            [s[p][sc]["measured"] / base for p in STRATEGIES],
            0.4,
            yerr=[s[p][sc]["measured_standard_error"] / base for p in STRATEGIES],
            label="measured (receipts)",
        )
        ax.set_xticks(x, [p.replace("_", " ") for p in STRATEGIES])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel("cost per request / uniform's expected")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def run(size_name: str = "full", out: Path | None = None, log=print) -> dict:
    """The whole benchmark; writes ``placement_results.json`` and ``placement.png`` into ``out`` when given."""
    size = SIZES[size_name]
    w = workload(size)
    tmp = Path(tempfile.mkdtemp(prefix="sisa-placement-bench-"))
    res: dict = {"size": size_name, "workload": dict(size)}
    try:
        with timed() as t:
            for strategy in STRATEGIES:
                res[strategy] = track(strategy, size, w, tmp / strategy, log)
        res["seconds"] = t.seconds
        res["epochs_per_stage"] = list(load_config(config(size, "uniform")).epochs_per_stage())
        res["summary"] = summary(res, size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "placement_results.json").write_text(json.dumps(res, indent=1, default=float))
        (out / "placement.png").write_bytes(plot(res))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--out", type=Path, default=Path("/tmp/sisa-placement-bench"))
    a = ap.parse_args()
    res = run(a.size, a.out)
    if a.size == "full":
        (ROOT / "docs" / "bench").mkdir(parents=True, exist_ok=True)
        shutil.copy(a.out / "placement.png", ROOT / "docs" / "bench" / "placement.png")
    print(json.dumps(res["summary"], indent=1, default=float))


if __name__ == "__main__":
    main()
