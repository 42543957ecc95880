"""Accuracy against the number of shards S (R as in the config) on digits and on the synthetic set, each
from its shipped config (configs/digits.yaml, configs/synthetic.yaml) with only S and the seed changed.
The seed also draws the held-out rows, so several seeds average over test sets too. `precision_cost`: the
held-out accuracy of each shipped config under training.precision 32-true and bf16-mixed
(``python -m benchmarks.accuracy_bench [full|quick|smoke]``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks.common import summary
from benchmarks.workloads import ROOT, SIZES, Size, shipped_config
from sisa import SisaEnsemble
from sisa.config import load_config

PRECISIONS = ("32-true", "bf16-mixed")


def sweep(name: str, size: Size, seeds, tmp: Path) -> dict:
    by_s = {}
    for S in size.sweep_shards:
        accs = []
        for seed in seeds:
            wd = tmp / f"acc-{name}-{S}-{seed}"
            with SisaEnsemble.from_config(shipped_config(name, size, S, seed), wd) as ens:
                ens.fit()
                accs.append(ens.last_fit_metrics["ensemble_accuracy"])
            shutil.rmtree(wd, ignore_errors=True)
        by_s[S] = summary(accs)
    out = {"dataset": name, "seeds": list(seeds), "accuracy": {str(s): v for s, v in by_s.items()}}
    if 1 in by_s and 5 in by_s:
        out["gap_pp_s5_vs_s1"] = 100 * (by_s[1]["mean"] - by_s[5]["mean"])
    return out


def precision_cost(name: str, size: Size, seeds, tmp: Path, executor: str | None = None) -> dict:
    """Held-out ensemble accuracy of the shipped config (its own S) under ``training.precision`` 32-true and
    bf16-mixed, per seed, and the mean difference in percentage points (bf16 minus fp32)."""
    acc: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for seed in seeds:
        for precision in PRECISIONS:
            cfg = shipped_config(name, size, load_config(ROOT / "configs" / f"{name}.yaml").sharding.shards, seed)
            cfg["training"]["precision"] = precision
            if executor:
                cfg["cluster"]["executor"] = executor
            wd = tmp / f"prec-{name}-{precision}-{seed}"
            with SisaEnsemble.from_config(cfg, wd) as ens:
                ens.fit()
                acc[precision].append(ens.last_fit_metrics["ensemble_accuracy"])
            shutil.rmtree(wd, ignore_errors=True)
    diffs = [100 * (b - a) for a, b in zip(acc[PRECISIONS[0]], acc[PRECISIONS[1]])]
    return {
        "dataset": name,
        "seeds": list(seeds),
        "accuracy": {p: summary(v) for p, v in acc.items()},
        "bf16_minus_fp32_pp": summary(diffs),
    }


def main() -> None:
    """``python -m benchmarks.accuracy_bench [SIZE]``: the accuracy cost of bf16-mixed on the shipped configs."""
    import json
    import sys
    import tempfile

    size = SIZES[sys.argv[1] if len(sys.argv) > 1 else "full"]
    with tempfile.TemporaryDirectory(prefix="sisa-acc-") as d:
        for name, seeds in (("digits", size.digits_seeds), ("synthetic", size.synthetic_seeds)):
            print(json.dumps(precision_cost(name, size, seeds, Path(d), executor="inprocess")))


if __name__ == "__main__":
    main()
