"""Turn the suite's results (results.json) into the markdown table and the PNG plots.

Every figure in the table is a ratio measured within one run; absolute times are given as context only.
"""

from __future__ import annotations

import io


def _fmt(x, digits=2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _status(value, op: str, target: float) -> str:
    if value is None or value != value:  # None or NaN
        return "–"
    ok = value >= target if op == ">=" else value <= target
    return "met" if ok else "**not met**"


def _precision(r: dict) -> str:
    p = r["workload"].get("precision", "32-true")
    return "" if p == "32-true" else f", `precision: {p}`"


def figures(r: dict) -> list[dict]:
    """One row per figure: name, target, measured value (text), status."""
    rows = []
    d, t = r.get("deletion", {}), r.get("training", {})
    one = d.get("single")
    if one:
        rows.append(
            {
                "figure": f"one-deletion speedup vs full ensemble retrain ÷ analytic bound (S={r['workload']['shards']}, R={r['workload']['slices']}{_precision(r)})",
                "target": "≥ 0.90",
                "value": f"{_fmt(one['speedup_over_bound'])} ({_fmt(one['speedup_vs_full_ensemble'], 1)}× of {_fmt(one['bound_real_partition'], 2)}×; formula {_fmt(one['bound_formula'], 2)}×; each fit with the deletions after it: {', '.join(_fmt(x) for x in one.get('window_speedups_over_bound', []))})",
                "cpu": _fmt(one.get("cpu_speedup_over_bound")),
                "status": _status(one["speedup_over_bound"], ">=", 0.90),
            }
        )
        if "vs_monolithic" in d:
            rows.append(
                {
                    "figure": "one-deletion speedup vs retraining one monolithic model on all rows",
                    "target": "reported",
                    "value": f"{_fmt(d['vs_monolithic'], 1)}×",
                    "cpu": f"{_fmt(d.get('cpu_vs_monolithic'), 1)}×",
                    "status": "",
                }
            )
    for b in d.get("batched", []):
        if b.get("stratified"):
            value = f"{_fmt(b['measured_over_expected'])} (the stratified mean of one deletion per slice position)"
            est, cpu = b["measured_over_expected"], b.get("cpu_measured_over_expected")
        else:
            est, cpu = b["estimated_measured_over_expected"], b.get("cpu_estimated_measured_over_expected")
            value = (
                f"{_fmt(est)} (the one draw run: {_fmt(b['measured_over_expected'])} = measured/plan "
                f"{_fmt(b['measured_over_plan'])} × plan/expected {_fmt(b['plan_over_expected'])}, "
                f"the draw at percentile {b['draw_percentile']:.0f} of plan costs)"
            )
        rows.append(
            {
                "figure": f"K={b['k']} ids in one call: measured / expected cost (`costmodel.expected_batched`)",
                "target": "≤ 1.10",
                "value": value,
                "cpu": _fmt(cpu)
                + (f" (other jobs: {_fmt(b['other_jobs_cores'])} cores)" if "other_jobs_cores" in b else ""),
                "status": _status(est, "<=", 1.10),
            }
        )
    for e in r.get("engine", {}).values():
        med, w = e["median_ms_per_step"], e["workload"]
        shape = "-".join(str(x) for x in [w["features"], *w["hidden"], w["classes"]])
        lo, hi = e["plain_over_fast_spread"]
        rows.append(
            {
                "figure": f"training step, plain torch loop ÷ sisa `engine: fast` (MLP {shape}, Adam, batch {w['batch']}, 1 thread)",
                "target": "≥ 2.0",
                "value": f"{_fmt(e['plain_over_fast'])} (spread {_fmt(lo)}–{_fmt(hi)}; ms/step: plain {_fmt(med['plain'], 3)}, "
                f"sisa eager {_fmt(med['eager'], 3)}, fast {_fmt(med['fast'], 3)})",
                "cpu": "",
                "status": _status(e["plain_over_fast"], ">=", 2.0),
            }
        )
        rows.append(
            {
                "figure": f"`engine: fast` step ÷ arithmetic limit (the step's GEMMs alone, MLP {shape}, batch {w['batch']})",
                "target": "≤ 5 (stretch)",
                "value": f"{_fmt(e['fast_over_arithmetic_limit'])} ({_fmt(e['flops_per_step'] / 1e6, 1)} MFLOP/step at a measured "
                f"{_fmt(e['sgemm_gflops'], 0)} GFLOP/s = {_fmt(e['gemm_ms_per_step'], 3)} ms; plain loop {_fmt(e['plain_over_arithmetic_limit'])})",
                "cpu": "",
                "status": _status(e["fast_over_arithmetic_limit"], "<=", 5.0),
            }
        )
    if "framework_vs_plain" in t:
        rows.append(
            {
                "figure": "full ensemble training vs a plain torch loop, same sample-epochs, model, batch size, 1 thread",
                "target": "≤ 1.15",
                "value": _fmt(t["framework_vs_plain"]),
                "cpu": f"{_fmt(t.get('framework_cpu_vs_plain_cpu'))} (inside Lightning's fit only: {_fmt(t['framework_stage_cpu_vs_plain_cpu'])})",
                "status": _status(t["framework_vs_plain"], "<=", 1.15),
            }
        )
    if "scaling_2_vs_1" in t:
        rows.append(
            {
                "figure": "shard-parallel scaling, 2 Ray workers vs 1, on 2 cores",
                "target": "≥ 1.7×",
                "value": f"{_fmt(t['scaling_2_vs_1'])}× (weights identical: {t['weights_identical_1_vs_2_workers'] and t.get('weights_identical_1_vs_1_worker', True)})",
                "cpu": f"cores busy: {_fmt(t.get('cores_used_1_worker'))} with 1 worker, {_fmt(t.get('cores_used_2_workers'))} with 2; "
                f"other jobs meanwhile: {_fmt(t['fit_2_workers'].get('other_jobs_cores'))} cores",
                "status": _status(t["scaling_2_vs_1"], ">=", 1.7),
            }
        )
    if one:
        ov = one["overhead_seconds"]
        rows.append(
            {
                "figure": "deletion wall time minus retrain compute, tracking off (warm workers)",
                "target": "≤ 1 s",
                "value": f"mean {_fmt(sum(ov) / len(ov))} s, max {_fmt(max(ov))} s",
                "cpu": _mean_s(one.get("overhead_cpu_seconds")),
                "status": _status(max(ov), "<=", 1.0),
            }
        )
    tr = d.get("tracked")
    if tr and tr["overhead_seconds"]:
        ov = tr["overhead_seconds"]
        fin, pub = tr["mlflow_finish_seconds"], tr["mlflow_publish_seconds"]
        rows.append(
            {
                "figure": "the same with MLflow tracking on",
                "target": "≤ 1 s",
                "value": f"mean {_fmt(sum(ov) / len(ov))} s, max {_fmt(max(ov))} s; of which MLflow runs, metrics and plots {_fmt(sum(fin) / len(fin))} s, model version publish and purge {_fmt(sum(pub) / len(pub))} s",
                "cpu": _mean_s(tr.get("overhead_cpu_seconds")),
                "status": _status(max(ov), "<=", 1.0),
            }
        )
    rows += overhead_figures(r.get("overhead"))
    inf = r.get("inference")
    if inf:
        big, small = inf["by_rows"][-1], inf["by_rows"][0]
        rows.append(
            {
                "figure": f"`predict_proba` vs the sum of the {inf['shards']} sub-models' forward passes ({big['rows']} rows)",
                "target": "≤ 1.1",
                "value": f"{_fmt(big['proba_over_forwards'])} ({small['rows']} row: {_fmt(small['proba_over_forwards'])}, fused)",
                "status": _status(big["proba_over_forwards"], "<=", 1.1),
            }
        )
    acc = r.get("accuracy", {})
    for name, a in acc.items():
        curve = ", ".join(f"S={s}: {v['mean']:.3f}" for s, v in a["accuracy"].items())
        gap = a.get("gap_pp_s5_vs_s1")
        digits = name == "digits"
        rows.append(
            {
                "figure": f"accuracy vs S on {name} ({len(a['seeds'])} seed(s))"
                + ("; S=5 within 2 pp of S=1" if digits else ""),
                "target": "≤ 2 pp" if digits else "reported",
                "value": curve + (f"; gap {gap:.2f} pp" if gap is not None else ""),
                "status": _status(gap, "<=", 2.0) if digits else "",
            }
        )
    return rows + precision_figures(r)


def precision_figures(r: dict) -> list[dict]:
    """The ``training.precision: bf16-mixed`` rows: its step against the plain loops and its own arithmetic
    limit (`benchmarks.engine_bench`), and its accuracy cost (`benchmarks.accuracy_bench.precision_cost`)."""
    rows = []
    for e in r.get("engine", {}).values():
        if "plain_over_fast_bf16" not in e:
            continue
        w, med = e["workload"], e["median_ms_per_step"]
        shape = "-".join(str(x) for x in [w["features"], *w["hidden"], w["classes"]])
        mid, lo, hi = e["plain_over_fast_bf16_paired"]
        amid, alo, ahi = e["plain_bf16_over_fast_bf16_paired"]
        fp32_meets = e["plain_over_fast"] >= 2.0  # there the target is the fp32 row's, bf16 is reported only
        rows.append(
            {
                "figure": f"training step, plain fp32 loop ÷ `engine: fast` + `precision: bf16-mixed` (MLP {shape}, batch {w['batch']}, 1 thread; other bits)",
                "target": "reported (fp32 `fast` is faster here)" if fp32_meets else "≥ 2.0",
                "value": f"{_fmt(e['plain_over_fast_bf16'])} (paired {_fmt(mid)} [{_fmt(lo)}–{_fmt(hi)}]; plain loop under autocast(bf16) ÷ it: {_fmt(amid)} [{_fmt(alo)}–{_fmt(ahi)}]; ms/step: fp32 fast {_fmt(med['fast'], 3)}, bf16 fast {_fmt(med['fast_bf16'], 3)})",
                "cpu": _fmt(e["plain_over_fast_bf16_cpu_paired"][0]),
                "status": "" if fp32_meets else _status(e["plain_over_fast_bf16"], ">=", 2.0),
            }
        )
        rows.append(
            {
                "figure": f"`bf16-mixed` fast step ÷ its arithmetic limit (the step's GEMMs in bf16, MLP {shape}, batch {w['batch']})",
                "target": "≤ 5 (stretch)",
                "value": f"{_fmt(e['fast_bf16_over_bf16_limit'])} (bf16 GEMMs {_fmt(e['bf16_gemm_gflops'], 0)} GFLOP/s = {_fmt(e['bf16_gemm_ms_per_step'], 3)} ms, the fp32 GEMMs take {_fmt(e['fp32_over_bf16_gemm'])}× as long)",
                "cpu": "",
                "status": _status(e["fast_bf16_over_bf16_limit"], "<=", 5.0),
            }
        )
    for name, a in r.get("precision_accuracy", {}).items():
        acc, d = a["accuracy"], a["bf16_minus_fp32_pp"]
        rows.append(
            {
                "figure": f"held-out accuracy, `bf16-mixed` − `32-true`, shipped {name} config ({len(a['seeds'])} seed(s))",
                "target": "reported",
                "value": f"{d['mean']:+.2f} pp (sd {d['std']:.2f}; fp32 {acc['32-true']['mean']:.4f}, bf16 {acc['bf16-mixed']['mean']:.4f})",
                "cpu": "",
                "status": "",
            }
        )
    return rows


def overhead_figures(o: dict | None) -> list[dict]:
    """A deletion's fixed costs over its own retraining compute (`benchmarks.overhead_bench`): to effective
    with tracking off and on, to done with MLflow on, one request at a time and a settled queue."""
    if not o:
        return []

    def spread(d):
        return f"{_fmt(d['median'], 3)} [{_fmt(d['min'], 3)}, {_fmt(d['max'], 3)}]"

    def row(name, run, key, target, limit):
        frac, sec = o[run]["fraction_of_compute"][key], o[run][f"{key}_seconds"]
        compute = o[run]["retrain_compute_seconds"]
        return {
            "figure": f"{name} (S={o['shards']}, one-row deletions, median [min, max] of {frac['n']})",
            "target": target,
            "value": f"{spread(frac)}: {spread(sec)} s against {spread(compute)} s of retraining compute",
            "status": _status(frac["median"], "<=", limit),
        }

    q = o["queue"]
    return [
        row(
            "a deletion's fixed cost to effective ÷ its retraining compute, tracking off",
            "tracking_off",
            "fixed_to_effective",
            "≤ 0.10",
            0.10,
        ),
        row("the same with MLflow on", "tracking_on", "fixed_to_effective", "≤ 0.10", 0.10),
        row(
            'fixed cost to done (every copy purged) ÷ retraining compute, MLflow on, `wait="done"` each',
            "tracking_on",
            "fixed_to_done",
            "≤ 0.25",
            0.25,
        ),
        *(
            [
                {
                    **row("the same to the run logged (behind done)", "tracking_on", "fixed_to_logged", "reported", 1),
                    "status": "",
                }
            ]
            if "fixed_to_logged" in o["tracking_on"]["fraction_of_compute"]
            else []
        ),
        {
            "figure": f'the same for a queue of {q["settled"]} `wait="effective"` deletions settled in one batch',
            "target": "≤ 0.25",
            "value": f"{_fmt(q['fixed_to_done_fraction_of_compute'], 3)}: {_fmt(q['fixed_to_done_per_request'], 3)} s "
            + (
                f"per request (the batch done {_fmt(q['settle_to_done_seconds'], 3)} s into its settle; "
                f"the bookkeeping behind it ends at {_fmt(q['settle_seconds'], 3)} s)"
                if "settle_to_done_seconds" in q
                else f"per request (settle {_fmt(q['settle_seconds'])} s)"
            ),
            "status": _status(q["fixed_to_done_fraction_of_compute"], "<=", 0.25),
        },
    ]


def _mean_s(values) -> str:
    values = [v for v in values or [] if v == v]
    return f"mean {sum(values) / len(values):.2f} s" if values else "–"


def markdown(r: dict) -> str:
    lines = [
        "| figure | target | measured (wall time) | same in CPU time | status |",
        "|---|---|---|---|---|",
    ]
    for row in figures(r):
        lines.append(f"| {row['figure']} | {row['target']} | {row['value']} | {row.get('cpu', '')} | {row['status']} |")
    lines.append("")
    lines.append(context(r))
    return "\n".join(lines) + "\n"


def context(r: dict) -> str:
    w, t, m = r["workload"], r.get("training", {}), r["machine"]
    parts = [
        f"Size `{r['size']}`: {w['rows']:,} training rows × {w['features']} features, {w['classes']} classes, "
        f"MLP {w['hidden']}, batch {w['batch_size']}, e={w['epochs']} (paper schedule {w['epochs_per_stage']} per stage), "
        f"S={w['shards']}, R={w['slices']}."
    ]
    if "fit_1_worker" in t:
        fits1 = [f"{f['wall_seconds']:.1f}" for f in t["fit_1_worker"].get("runs", [t["fit_1_worker"]])]
        parts.append(
            f"Absolute times (context only): ensemble fit {' and '.join(fits1)} s on 1 worker, "
            f"{t['fit_2_workers']['wall_seconds']:.1f} s on 2; monolithic model {t.get('monolithic', {}).get('wall_seconds', float('nan')):.1f} s; "
            f"expected one-deletion {r['deletion']['single']['expected_seconds']:.2f} s."
        )
    if "fit_1_worker" in t:
        others = [f.get("other_jobs_cores") for f in [*t["fit_1_worker"].get("runs", []), t["fit_2_workers"]]]
        if all(o is not None for o in others):
            parts.append(
                "Other processes (other jobs, and this run's Ray daemons) used "
                + ", ".join(f"{o:.2f}" for o in others)
                + " cores on average during the two 1-worker fits and the 2-worker fit."
            )
    parts.append(
        f"Machine: {m['cpus']} CPUs, load average {m['load_average']} at start and "
        f"{r.get('machine_end', {}).get('load_average')} at the end; suite took {r.get('suite_seconds', 0):.0f} s."
    )
    return " ".join(parts)


# -- plots ---------------------------------------------------------------------------------------
def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_accuracy(r: dict) -> bytes | None:
    acc = r.get("accuracy")
    if not acc:
        return None
    fig = _figure(5.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for name, a in acc.items():
        s = [int(k) for k in a["accuracy"]]
        mean = [v["mean"] for v in a["accuracy"].values()]
        std = [v["std"] for v in a["accuracy"].values()]
        ax.errorbar(s, mean, yerr=std, marker="o", capsize=3, label=f"{name} ({len(a['seeds'])} seed(s))")
    ax.set_xscale("log")
    ax.set_xticks(sorted({int(k) for a in acc.values() for k in a["accuracy"]}))
    ax.set_xticklabels([str(x) for x in sorted({int(k) for a in acc.values() for k in a["accuracy"]})])
    ax.set_xlabel("shards S (R as in the config)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs number of shards")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def plot_deletion_cost(r: dict) -> bytes | None:
    b = r.get("deletion", {}).get("batched")
    if not b:
        return None
    fig = _figure(5.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    ks = [x["k"] for x in b]
    full = [x["full_sample_epochs"] for x in b]
    pos = range(len(ks))
    ax.bar(
        [p - 0.27 for p in pos],
        [x["expected_sample_epochs"] / f for x, f in zip(b, full)],
        0.27,
        yerr=[x.get("simulated_plan_std", 0.0) / f for x, f in zip(b, full)],
        capsize=3,
        label="expected (costmodel; bar: ±1 sd of one draw)",
    )
    ax.bar(pos, [x["plan_sample_epochs"] / f for x, f in zip(b, full)], 0.27, label="plan for the ids drawn")
    ax.bar(
        [p + 0.27 for p in pos],
        [x["measured_sample_epochs"] / f for x, f in zip(b, full)],
        0.27,
        label="measured (wall time)",
    )
    ax.plot(
        list(pos),
        [min(1.5, x["sequential_expected_sample_epochs"] / f) for x, f in zip(b, full)],
        "k--",
        marker="x",
        label="one call per id (expected)",
    )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(pos))
    ax.set_xticklabels([f"K={k}" for k in ks])
    ax.set_ylabel("cost / full retrain")
    ax.set_title("Cost of deleting K ids in one call")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_speedup(r: dict) -> bytes | None:
    d = r.get("deletion", {})
    one = d.get("single")
    if not one:
        return None
    fig = _figure(5.5, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    names = ["bound S·3R/(2R+1)", "bound (real partition)", "measured vs ensemble fit"]
    vals = [one["bound_formula"], one["bound_real_partition"], one["speedup_vs_full_ensemble"]]
    if "vs_monolithic" in d:
        names.append("measured vs monolithic fit")
        vals.append(d["vs_monolithic"])
    ax.barh(names, vals, color=["#bbbbbb", "#999999", "#1f77b4", "#ff7f0e"][: len(vals)])
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.1f}×", va="center")
    ax.set_xlim(0, max(vals) * 1.2)
    ax.set_xlabel("speedup of one deletion over a full retrain")
    ax.set_title("One deletion: measured vs analytic")
    return _png(fig)


PLOTS = {"accuracy_vs_shards.png": plot_accuracy, "deletion_cost.png": plot_deletion_cost, "speedup.png": plot_speedup}
