"""Accuracy against the number of shards S (R as in the config) on digits and on the synthetic set, each
from its shipped config (configs/digits.yaml, configs/synthetic.yaml) with only S and the seed changed.
The seed also draws the held-out rows, so several seeds average over test sets too."""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks.common import summary
from benchmarks.workloads import Size, shipped_config
from sisa import SisaEnsemble


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
