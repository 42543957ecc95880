"""Continual data: `add` with append and canonical placement against refitting every time.

Fit on 50% of a synthetic dataset, then add 10 batches of 5% each, with a few deletions of live rows
(old and new alike) after each batch but the last. For each placement: the cost of every addition in
sample-epochs (counted by the workers) and wall time, against a full refit of the live rows at that
point (timed, in a scratch workdir); the analytic expectation (`costmodel.expected_addition` /
`expected_append`) against the measured cost; the deletions' costs (appended stages make them dearer);
the final accuracy against ``fit(all live rows)``; and the invariants at the end: canonical == fit(live
rows), append == the replay of its history without the deleted rows, and append + `compact` == fit(live
rows), each bit for bit. Small data, in-process executor: a few minutes on 2 cores.

``python benchmarks/add_bench.py [--size full|smoke] [--out DIR]`` writes ``results.json`` and
``add_cost.png`` (cumulative compute of append, canonical and refit-every-time) into DIR (default
docs/bench for the plot and /tmp/sisa-add-bench for the rest).
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
from sisa import SisaEnsemble  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    "full": {"rows": 8000, "eval_rows": 1000, "batches": 10, "deletions": 3, "epochs": 8, "hidden": [64]},
    "smoke": {"rows": 640, "eval_rows": 160, "batches": 3, "deletions": 2, "epochs": 4, "hidden": [16]},
}
PLACEMENTS = ("append", "canonical")


def config(size: dict, placement: str) -> dict:
    return {
        "name": f"add-bench-{placement}",
        "seed": 5,
        "sharding": {"shards": 4, "slices": 4, "new_rows": placement},
        "model": {"name": "mlp", "kwargs": {"hidden": list(size["hidden"])}},
        "training": {"epochs": size["epochs"], "batch_size": 64, "lr": 3e-3},
        "tracking": {"enabled": False},
        "cluster": {"executor": "inprocess"},
    }


def workload(size: dict, seed: int = 0) -> dict:
    """The data, the initial 50%, the batches of 5% and the ids deleted after each batch (fixed in advance
    from the live rows at that point, so every placement sees the same history)."""
    from sklearn.datasets import make_classification

    n, ne = size["rows"], size["eval_rows"]
    X, y = make_classification(
        n_samples=n + ne, n_features=20, n_informative=10, n_classes=4, class_sep=1.0, flip_y=0.02, random_state=seed
    )
    X, ids = X.astype(np.float32), np.arange(10_000, 10_000 + n + ne)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    step = n // (2 * size["batches"])
    d0 = order[: n // 2]
    batches = [order[n // 2 + b * step : n // 2 + (b + 1) * step] for b in range(size["batches"])]
    live, gone = set(ids[d0].tolist()), []
    for b, idx in enumerate(batches):
        live |= set(ids[idx].tolist())
        pick = [] if b == len(batches) - 1 else rng.choice(sorted(live), size["deletions"], replace=False).tolist()
        live -= set(pick)
        gone.append(pick)
    return {"X": X, "y": y, "ids": ids, "eval": (X[n:], y[n:], ids[n:]), "d0": d0, "batches": batches, "gone": gone}


def _rows(w: dict, idx, drop=()) -> tuple:
    keep = ~np.isin(w["ids"][idx], list(drop))
    return w["X"][idx][keep], w["y"][idx][keep], w["ids"][idx][keep]


def _fit(cfg: dict, w: dict, idx, wd: Path, drop=()) -> tuple[SisaEnsemble, dict]:
    shutil.rmtree(wd, ignore_errors=True)
    ens, log = SisaEnsemble.from_config(cfg, wd), StageLog()
    X, y, ids = _rows(w, idx, drop)
    with timed() as t:
        ens.fit(X, y, ids=ids, eval_set=w["eval"], progress=log)
    return ens, {"sample_epochs": log.sample_epochs, "seconds": t.seconds}


def track(placement: str, size: dict, w: dict, wd: Path, log=print) -> tuple[SisaEnsemble, dict]:
    """One placement's history: fit, then each batch (estimate, add) and the deletions after it."""
    ens, fit = _fit(config(size, placement), w, w["d0"], wd)
    steps = []
    for b, (idx, gone) in enumerate(zip(w["batches"], w["gone"])):
        X, y, ids = _rows(w, idx)
        plan = ens.estimate_addition_cost(X, ids=ids)
        slog = StageLog()
        with timed() as t:
            r = ens.add(X, y, ids=ids, progress=slog)
        step = {
            "batch": b + 1,
            "rows_added": len(ids),
            "measured_sample_epochs": slog.sample_epochs,
            "receipt_sample_epochs": r.cost["sample_epochs"],
            "estimate_sample_epochs": plan.sample_epochs,
            "expected_sample_epochs": r.cost["expected_sample_epochs"],
            "full_refit_sample_epochs": r.cost["full_retrain_sample_epochs"],
            "add_seconds": t.seconds,
            "deletion_overhead_sample_epochs": r.cost.get("deletion_overhead_sample_epochs", 0.0),
            "stages": [len(sh.slices) for sh in ens.manifest.shards],
        }
        if gone:
            dlog = StageLog()
            with timed() as t:
                d = ens.delete(gone, progress=dlog)
            step |= {
                "delete_sample_epochs": dlog.sample_epochs,
                "delete_receipt_sample_epochs": d.cost["sample_epochs"],
            }
            step |= {
                "delete_seconds": t.seconds,
                "delete_appended_sample_epochs": d.cost.get("appended_stages_sample_epochs", 0),
            }
        steps.append(step)
        log(f"[add-bench] {placement} batch {b + 1}: {slog.sample_epochs} sample-epochs in {step['add_seconds']:.2f} s")
    acc = ens.manifest.metrics.get("ensemble_accuracy")
    return ens, {"fit": fit, "steps": steps, "final_accuracy": acc}


def refits(size: dict, w: dict, tmp: Path, log=print) -> list[dict]:
    """A full refit of the live rows after each batch (before that batch's deletions): its cost and time."""
    out, live, gone = [], list(w["d0"]), set()
    for b, idx in enumerate(w["batches"]):
        live += list(idx)
        _, fit = _fit(config(size, "canonical"), w, np.array(live), tmp / "refit", gone)
        out.append(fit)
        gone |= set(w["gone"][b])
        log(f"[add-bench] refit after batch {b + 1}: {fit['sample_epochs']} sample-epochs in {fit['seconds']:.2f} s")
    return out


def _files(ens) -> list:
    return [([e.sha256 for e in sh.slices], [c.sha256 for c in sh.checkpoints]) for sh in ens.manifest.shards]


def _same(a, b) -> bool:
    import torch

    if a.active_shards() != b.active_shards() or _files(a) != _files(b):
        return False
    for s in a.active_shards():
        sa, sb = a.load_shard_model(s).state_dict(), b.load_shard_model(s).state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def invariants(size: dict, w: dict, ens: dict, tmp: Path) -> dict:
    """canonical == fit(live); append == replay without the deleted rows; append + compact == fit(live)."""
    gone = {i for g in w["gone"] for i in g}
    every = np.concatenate([w["d0"], *w["batches"]])
    ref, fit = _fit(config(size, "canonical"), w, every, tmp / "live", gone)
    replay, _ = _fit(config(size, "append"), w, w["d0"], tmp / "replay", gone)
    for idx in w["batches"]:
        replay.add(*_rows(w, idx, gone)[:2], ids=_rows(w, idx, gone)[2])
    out = {
        "canonical_equals_fit_of_live_rows": _same(ens["canonical"], ref),
        "append_equals_replay": _same(ens["append"], replay),
        "fit_of_live_rows_accuracy": ref.manifest.metrics.get("ensemble_accuracy"),
        "fit_of_live_rows_sample_epochs": fit["sample_epochs"],
    }
    plan = ens["append"].estimate_compaction_cost()
    clog = StageLog()
    with timed() as t:
        ens["append"].compact(progress=clog)
    out["compaction"] = {
        "estimate_sample_epochs": plan.sample_epochs,
        "measured_sample_epochs": clog.sample_epochs,
        "seconds": t.seconds,
        "deletion_overhead_before": plan.deletion_overhead_sample_epochs,
        "expected_deletion_before": plan.expected_deletion_sample_epochs_before,
        "expected_deletion_after": plan.expected_deletion_sample_epochs_after,
        "equals_fit_of_live_rows": _same(ens["append"], ref),
    }
    return out


def summary(res: dict) -> dict:
    """Per placement: totals, the worst deviation of measured from expected cost, and the cumulative compute
    (fit + additions + deletions) after each batch, with refit-every-time alongside."""
    out = {}
    for p in PLACEMENTS:
        steps = res[p]["steps"]
        dev = [abs(s["measured_sample_epochs"] / s["expected_sample_epochs"] - 1) for s in steps]
        cum, acc = [], res[p]["fit"]["sample_epochs"]
        for s in steps:
            acc += s["measured_sample_epochs"] + s.get("delete_sample_epochs", 0)
            cum.append(acc)
        adds = sum(s["measured_sample_epochs"] for s in steps)
        out[p] = {
            "add_sample_epochs": adds,
            "delete_sample_epochs": sum(s.get("delete_sample_epochs", 0) for s in steps),
            "add_seconds": sum(s["add_seconds"] for s in steps),
            "add_over_refit": adds / sum(r["sample_epochs"] for r in res["refit"]),
            "max_deviation_from_expected": max(dev),
            "within_10_percent": max(dev) <= 0.10,
            "measured_equals_receipt": all(s["measured_sample_epochs"] == s["receipt_sample_epochs"] for s in steps),
            "cumulative_sample_epochs": cum,
            "final_accuracy": res[p]["final_accuracy"],
        }
    cum, acc = [], res["canonical"]["fit"]["sample_epochs"]
    for s, r in zip(res["canonical"]["steps"], res["refit"]):
        acc += r["sample_epochs"] + s.get("delete_sample_epochs", 0)
        cum.append(acc)
    out["refit"] = {
        "sample_epochs": sum(r["sample_epochs"] for r in res["refit"]),
        "seconds": sum(r["seconds"] for r in res["refit"]),
        "cumulative_sample_epochs": cum,
    }
    return out


def plot(res: dict) -> bytes:
    """Cumulative compute after each batch: additions alone, and additions with the deletions between them."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    s = res["summary"]
    fit = {p: res[p]["fit"]["sample_epochs"] for p in PLACEMENTS}
    adds = {p: np.cumsum([fit[p]] + [x["measured_sample_epochs"] for x in res[p]["steps"]])[1:] for p in PLACEMENTS}
    adds["refit"] = np.cumsum([fit["canonical"]] + [r["sample_epochs"] for r in res["refit"]])[1:]
    style = {"append": ("o", "-"), "canonical": ("s", "--"), "refit": ("^", ":")}
    for k, (title, series) in enumerate(
        (
            ("additions only", {p: adds[p] for p in (*PLACEMENTS, "refit")}),
            ("additions + deletions", {p: s[p]["cumulative_sample_epochs"] for p in (*PLACEMENTS, "refit")}),
        )
    ):
        ax = fig.add_subplot(1, 2, k + 1)
        for name, cum in series.items():
            marker, line = style[name]
            label = {"refit": "refit every time"}.get(name, name)
            ax.plot(range(1, len(cum) + 1), [c / 1e3 for c in cum], marker=marker, linestyle=line, label=label)
        ax.set_xlabel("batches added (5% of the data each)")
        ax.set_ylabel("cumulative compute (k sample-epochs)")
        ax.set_title(f"fit on 50%, then 10 batches: {title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def run(size_name: str = "full", out: Path | None = None, log=print) -> dict:
    """The whole benchmark; writes ``add_results.json`` and ``add_cost.png`` into ``out`` when given."""
    size = SIZES[size_name]
    w = workload(size)
    tmp = Path(tempfile.mkdtemp(prefix="sisa-add-bench-"))
    try:
        res: dict = {"size": size_name, "workload": {k: v for k, v in size.items()}}
        ens = {}
        for p in PLACEMENTS:
            ens[p], res[p] = track(p, size, w, tmp / p, log)
        res["refit"] = refits(size, w, tmp, log)
        res["invariants"] = invariants(size, w, ens, tmp)
        res["summary"] = summary(res)
        for e in ens.values():
            e.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "add_results.json").write_text(json.dumps(res, indent=1, default=float))
        (out / "add_cost.png").write_bytes(plot(res))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--out", type=Path, default=Path("/tmp/sisa-add-bench"))
    a = ap.parse_args()
    res = run(a.size, a.out)
    if a.size == "full":
        (ROOT / "docs" / "bench").mkdir(parents=True, exist_ok=True)
        shutil.copy(a.out / "add_cost.png", ROOT / "docs" / "bench" / "add_cost.png")
    print(json.dumps({"summary": res["summary"], "invariants": res["invariants"]}, indent=1, default=float))


if __name__ == "__main__":
    main()
