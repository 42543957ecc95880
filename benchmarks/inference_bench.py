"""Inference figures: `predict_proba` of the ensemble against the sum of its sub-models' forward passes
on the same rows, and the fused path against the loop over sub-models, at several request sizes.

One torch thread, best of several rounds (interleaved), so that the ratios hold on a busy machine.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.common import best_of, ratio
from sisa.aggregate import FUSED_MAX_ROWS, Aggregator


def run(ens, X_eval: np.ndarray, sizes) -> dict:
    agg = ens._ctx.aggregator(ens.manifest)
    loop = Aggregator(dict(zip(agg.shards, agg.modules)), agg.num_classes, agg.method)
    loop._fused = None  # the same sub-models, evaluated one by one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    try:
        for n in [*sizes, len(X_eval)]:
            X = np.ascontiguousarray(X_eval[np.arange(n) % len(X_eval)])
            Xt = torch.from_numpy(X)

            def forwards(Xt=Xt):
                with torch.no_grad():
                    for m in agg.modules:
                        m(Xt)

            fns = {
                "sum_of_forwards": forwards,
                "predict_proba": lambda X=X: ens.predict_proba(X),
                "loop_predict_proba": lambda X=X: loop.predict_proba(X),
            }
            repeats = max(1, 400 // n)
            best = {k: float("inf") for k in fns}
            for _ in range(5):  # interleaved rounds: a burst of load hits every variant alike
                for k, fn in fns.items():
                    best[k] = min(best[k], best_of(fn, repeats, rounds=1))
            out.append(
                {
                    "rows": n,
                    "path": "fused" if agg._fused is not None and n <= FUSED_MAX_ROWS else "loop",
                    **{f"{k}_ms": v * 1000 for k, v in best.items()},
                    "proba_over_forwards": ratio(best["predict_proba"], best["sum_of_forwards"]),
                    "proba_over_loop_proba": ratio(best["predict_proba"], best["loop_predict_proba"]),
                }
            )
    finally:
        torch.set_num_threads(threads)
    return {"shards": len(agg.modules), "fused_max_rows": FUSED_MAX_ROWS, "by_rows": out}
