"""Accuracy against S with and without base data (`shards.base`), beside one model trained on everything,
and the cost of one deletion at each S: ``python -m benchmarks.base_bench [--quick] [--plot PNG]``.

Each dataset is the shipped config's (configs/digits.yaml, configs/synthetic.yaml; R, epochs and model as
there), its held-out rows drawn as fit draws them. 10% of the training rows (a seeded draw) are declared
base data: the "base" ensembles train them once into the start every shard shares and shard the other
90%; the "plain" ensembles shard all rows; the "encoder" ensembles are the base ones with ``model.encoder:
base`` (the start's body frozen, its features cached in the slices, heads trained per shard). "one model" is S=1, R=1 on every training row. The deletion
cost is the cost model's expected sample-epochs of deleting one uniformly drawn erasable row (analytic,
over every row) and the measured sample-epochs (what the workers trained, equal to the receipt's) and wall
seconds of deleting a few drawn rows, one call each. In-process executor, tracking off.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks.common import StageLog, summary
from benchmarks.workloads import ROOT

SHARDS = (1, 5, 10, 20, 50)
KINDS = ("plain", "base", "encoder")
BASE_FRACTION = 0.1


def config(
    name: str, shards: int, seed: int, slices: int | None = None, epochs: int | None = None, encoder: bool = False
) -> dict:
    from sisa.config import load_config

    cfg = load_config(ROOT / "configs" / f"{name}.yaml").model_dump(mode="json")
    cfg["sharding"]["shards"] = shards
    if slices is not None:
        cfg["sharding"]["slices"] = slices
    if epochs is not None:
        cfg["training"]["epochs"] = epochs
    cfg["seed"] = seed
    cfg["tracking"] = {"enabled": False}
    cfg["cluster"] = {**cfg["cluster"], "executor": "inprocess"}
    if encoder:
        cfg["model"]["encoder"] = "base"
    return cfg


def dataset(name: str, seed: int, n_samples: int | None):
    """(train X, y, ids), (eval X, y, ids) and the base mask over the training rows."""
    from sisa import data as datamod
    from sisa.config import load_config

    cfg = load_config(config(name, 1, seed))
    data = (
        cfg.data
        if n_samples is None
        else cfg.data.model_copy(update={"synthetic": cfg.data.synthetic.model_copy(update={"n_samples": n_samples})})
    )
    X, y, ids = datamod.builtin(name, data)
    (X, y, ids), eval_set = datamod.split_holdout(X, y, ids, seed, cfg.data.test_fraction)[:2]
    rng = np.random.default_rng(1000 + seed)
    base = np.zeros(len(y), bool)
    base[rng.choice(len(y), int(round(BASE_FRACTION * len(y))), replace=False)] = True
    return (X, y, ids), eval_set, base


def one_fit(cfg: dict, train, eval_set, base_rows, workdir: Path, deletions: int, seed: int) -> dict:
    """Fit, then delete ``deletions`` drawn erasable rows one call each: accuracy, the cost model's expected
    one-deletion sample-epochs, and per deletion the sample-epochs the workers trained (and the receipt's)."""
    from sisa import SisaEnsemble, costmodel

    X, y, ids = train
    shutil.rmtree(workdir, ignore_errors=True)
    with warnings.catch_warnings(), SisaEnsemble.from_config(cfg, workdir) as ens:
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        flog = StageLog()
        ens.fit(X, y, ids=ids, eval_set=eval_set, base=base_rows, progress=flog)
        out = {"accuracy": ens.last_fit_metrics["ensemble_accuracy"], "fit_seconds": time.perf_counter() - t0}
        # the shards' training CPU (the base stage excluded) per 1,000 sample-epochs: whole sub-models or heads
        out["train_cpu_ms_per_kse"] = 1e6 * flog.cpu_seconds / max(1, flog.sample_epochs)
        m = ens.manifest
        if m.base is not None:
            out["start_accuracy"] = start_accuracy(ens, eval_set)
        out["expected_delete_sample_epochs"] = costmodel.expected_single(
            m.slice_rows(), m.schedules(ens.config.epochs_per_stage())
        )
        victims = np.random.default_rng(seed).choice(len(ids), deletions, replace=False)
        out["deletions"] = []
        for v in victims:
            log = StageLog()
            t0 = time.perf_counter()
            receipt = ens.delete([ids[v]], progress=log)
            out["deletions"].append(
                {
                    "seconds": time.perf_counter() - t0,
                    "sample_epochs": log.sample_epochs,
                    "receipt_sample_epochs": receipt.cost["sample_epochs"],
                }
            )
    shutil.rmtree(workdir, ignore_errors=True)
    return out


def start_accuracy(ens, eval_set) -> float:
    """Accuracy of the shared start alone (the model trained on the base rows, before any shard)."""
    import torch

    from shards import training

    ctx, m = ens._ctx, ens.manifest
    store = ctx.storage()
    start = m.base if m.encoder is None else m.encoder  # with model.encoder: the whole start the body is from
    ckpt = training.load_checkpoint(store.read(start.file, start.sha256))
    module = training.init_module(ctx.spec(m, full=True), 0)
    module.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        pred = module.eval()(torch.from_numpy(np.asarray(eval_set[0], np.float32))).argmax(1).numpy()
    return float((pred == eval_set[1]).mean())


def sweep(
    name: str, seeds, shards, tmp: Path, n_samples: int | None = None, deletions: int = 3, epochs=None, log=print
) -> dict:
    rows: dict = {"one_model": [], "plain": {}, "base": {}, "encoder": {}}
    for seed in seeds:
        train, eval_set, base = dataset(name, seed, n_samples)
        X, y, ids = train
        one = config(name, 1, seed, slices=1, epochs=epochs)
        rows["one_model"].append(one_fit(one, train, eval_set, None, tmp / "one", 0, seed)["accuracy"])
        rest = (X[~base], y[~base], ids[~base])
        for S in shards:
            cfg = config(name, S, seed, epochs=epochs)
            p = one_fit(cfg, train, eval_set, None, tmp / "plain", deletions, seed)
            b = one_fit(cfg, rest, eval_set, (X[base], y[base], ids[base]), tmp / "base", deletions, seed)
            enc = config(name, S, seed, epochs=epochs, encoder=True)
            e = one_fit(enc, rest, eval_set, (X[base], y[base], ids[base]), tmp / "encoder", deletions, seed)
            for kind, r in (("plain", p), ("base", b), ("encoder", e)):
                rows[kind].setdefault(S, []).append(r)
            log(
                f"[base_bench] {name} seed {seed} S={S}: plain {p['accuracy']:.3f}, base {b['accuracy']:.3f}, "
                f"encoder {e['accuracy']:.3f}"
            )
    one = summary(rows["one_model"])
    out: dict = {"dataset": name, "seeds": list(seeds), "base_fraction": BASE_FRACTION, "one_model": one}
    first = rows["base"][shards[0]]  # the start depends on the seed and the base rows, not on S
    out["start_alone"] = summary(r["start_accuracy"] for r in first)
    for kind in KINDS:
        out[kind] = {}
        for S, runs in rows[kind].items():
            dels = [d for r in runs for d in r["deletions"]]
            acc = summary(r["accuracy"] for r in runs)
            expected = summary(r["expected_delete_sample_epochs"] for r in runs)
            out[kind][str(S)] = {
                "accuracy": acc,
                "gap_pp": 100 * (one["mean"] - acc["mean"]),
                "fit_seconds": summary(r["fit_seconds"] for r in runs),
                "train_cpu_ms_per_kse": summary(r["train_cpu_ms_per_kse"] for r in runs),
                "expected_delete_sample_epochs": expected,
                "delete_sample_epochs": summary(d["sample_epochs"] for d in dels),
                "delete_seconds": summary(d["seconds"] for d in dels),
                "measured_equals_receipt": all(d["sample_epochs"] == d["receipt_sample_epochs"] for d in dels),
            }
    return out


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(results), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    for i, r in enumerate(results):
        ax = fig.add_subplot(1, len(results), i + 1)
        base = f"{r['base_fraction']:.0%} base data"
        for kind, label in (("plain", "all rows sharded"), ("base", base), ("encoder", f"{base}, frozen encoder")):
            S = [int(s) for s in r[kind]]
            mean = np.array([r[kind][str(s)]["accuracy"]["mean"] for s in S])
            std = np.array([r[kind][str(s)]["accuracy"]["std"] for s in S])
            ax.errorbar(S, mean, yerr=std, marker="o", capsize=3, label=label)
        ax.axhline(r["one_model"]["mean"], color="gray", ls="--", label="one model, all rows")
        ax.axhline(r["start_alone"]["mean"], color="tab:orange", ls=":", label="the start alone (base rows)")
        ax.set_xscale("log")
        ax.set_xlabel("shards S")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{r['dataset']} ({len(r['seeds'])} seed(s))")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def table(results: list[dict]) -> str:
    lines = [
        "| dataset | S | one model | start alone | plain: acc (gap pp) | base: acc (gap pp) | encoder: acc (gap pp) | "
        "one deletion, sample-epochs expected plain / base / encoder | measured (mean ± sd) plain / base / encoder | "
        "seconds plain / base / encoder | shards' training CPU ms per 1,000 sample-epochs base / encoder |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for S in r["plain"]:
            row = [r[k][S] for k in KINDS]

            def acc(x):
                return f"{x['accuracy']['mean']:.3f} ± {x['accuracy']['std']:.3f} ({x['gap_pp']:.1f})"

            lines.append(
                f"| {r['dataset']} | {S} | {r['one_model']['mean']:.3f} | {r['start_alone']['mean']:.3f} | "
                + " | ".join(acc(x) for x in row)
                + " | "
                + " / ".join(f"{x['expected_delete_sample_epochs']['mean']:.0f}" for x in row)
                + " | "
                + " / ".join(_pm(x["delete_sample_epochs"]) for x in row)
                + " | "
                + " / ".join(f"{x['delete_seconds']['mean']:.2f}" for x in row)
                + " | "
                + " / ".join(_pm(x["train_cpu_ms_per_kse"], 2) for x in row[1:])
                + " |"
            )
    return "\n".join(lines)


def _pm(x: dict, digits: int = 0) -> str:
    return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="S in (1, 5), one seed, 2,000 synthetic rows")
    ap.add_argument("--deletions", type=int, default=3, help="one-row deletions measured per ensemble")
    ap.add_argument("--digits-seeds", type=int, default=3)
    ap.add_argument("--synthetic-seeds", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "base.json"))
    ap.add_argument("--plot", default=None, help="write the plot here (e.g. docs/bench/base_data.png)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    shards = (1, 5) if a.quick else SHARDS
    tmp = Path(tempfile.mkdtemp(prefix="sisa-base-bench-"))
    t0 = time.perf_counter()
    try:
        results = [
            sweep("digits", range(1 if a.quick else a.digits_seeds), shards, tmp, None, a.deletions),
            sweep(
                "synthetic",
                range(1 if a.quick else a.synthetic_seeds),
                shards,
                tmp,
                2000 if a.quick else None,
                a.deletions,
            ),
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "seconds": time.perf_counter() - t0}, indent=1))
    if a.plot:
        plot(results, Path(a.plot))
    print(table(results))
    print(f"[base_bench] {time.perf_counter() - t0:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
