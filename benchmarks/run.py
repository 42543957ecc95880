"""Run the benchmark suite: ``python -m benchmarks.run [--size full|quick|smoke] [--update-readme]``.

``--precision bf16-mixed`` trains the timing workload's fits with ``training.precision: bf16-mixed``.

Writes benchmarks/out/results.json, results.md (the table) and PNG plots. With ``--update-readme`` it also
copies the plots to docs/bench/ and rewrites the table between the README's benchmark markers.

Order (one local Ray with 2 CPUs; every timed phase runs on warm workers):
  1. fit the timing workload on 1 worker; half of the plain torch loop; two rounds of single deletions
     (one per slice position) on that ensemble;
  2. fit on 2 workers; fit again on 1 worker; the other half of the plain loop; two more rounds.
     Scaling, the plain-loop ratio and the deletion speedup use the mean of the two 1-worker fits (the
     machine drifts over minutes); the weights of all three fits must be identical;
  3. K ids per call, then deletions with MLflow on, on the second 1-worker ensemble; the monolithic model;
  4. inference on the 2-worker ensemble; 5. accuracy vs S on digits and the synthetic set;
  6. the small commands (`sisa status`, `locate`, `delete --dry-run`, `predict`), each a fresh process,
     on the 2-worker ensemble's workdir (`cli_bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the suite's own local Ray only
if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks import (  # noqa: E402
    accuracy_bench,
    cli_bench,
    deletion_bench,
    engine_bench,
    inference_bench,
    report,
    training_bench,
)
from benchmarks.common import init_ray, machine, ratio, reset_workers, slice_rows  # noqa: E402
from benchmarks.workloads import ROOT, SIZES, make_data  # noqa: E402

PHASES = (
    "engine",
    "plain",
    "monolithic",
    "deletion",
    "tracking",
    "inference",
    "accuracy",
    "cli",
    "add",
    "placement",
    "overhead",
)
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def run(size_name: str = "full", out: Path | None = None, skip=(), log=print, precision: str = "32-true") -> dict:
    size = replace(SIZES[size_name], precision=precision)
    out = Path(out or ROOT / "benchmarks" / "out")
    tmp = out / "work"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = init_ray(2)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the driver's own work (evaluation, inference) on one thread, like each worker
    t0 = time.perf_counter()
    say = log

    def log(msg):  # noqa: F811 - the caller's log, with the time since the start
        say(msg.replace("[bench]", f"[bench +{time.perf_counter() - t0:.0f}s]", 1))

    rng = np.random.default_rng(0)
    data = make_data(size)
    res: dict = {"size": size_name, "machine": machine(), "deletion": {}, "accuracy": {}}
    tb = training_bench
    try:
        if "engine" not in skip:  # the training step vs the plain loop and the arithmetic limit (one thread)
            res["engine"] = {
                name: engine_bench.run(name, 1 if size_name == "smoke" else 3) for name in engine_bench.WORKLOADS
            }
            log(
                "[bench] plain loop / fast engine: "
                + ", ".join(
                    f"{k} {v['plain_over_fast']:.2f}x (bf16-mixed {v['plain_over_fast_bf16']:.2f}x)"
                    for k, v in res["engine"].items()
                )
            )
        log(f"[bench] fitting {size.rows} rows, S={size.shards} R={size.slices}: 1 worker, 2 workers, 1 worker")
        ens_a, fit_a = tb.fit_on(size, data, tmp, "w1a", 1, fresh_pool=True)
        first = tb.weights(ens_a)
        rows0 = slice_rows(ens_a)
        res["workload"] = {
            **{
                k: getattr(size, k)
                for k in ("rows", "eval_rows", "features", "classes", "epochs", "batch_size", "shards", "slices")
            },
            "hidden": list(size.hidden),
            "precision": size.precision,
            "epochs_per_stage": list(ens_a.config.epochs_per_stage()),
        }
        rounds_a, rounds_b, plain = [], [], []  # after each 1-worker fit: half the plain loop, two rounds
        if "plain" not in skip:
            plain.append(tb.plain_part(ens_a, size, 0))
        if "deletion" not in skip:
            rounds_a = [deletion_bench.single_round(ens_a, rng) for _ in range(2)]
        ens_a.close()
        ens2, fit2 = tb.fit_on(size, data, tmp, "w2", 2)
        ens_b, fit_b = tb.fit_on(size, data, tmp, "w1b", 1, fresh_pool=True)  # from here on, one worker
        ref = tb.reference([fit_a, fit_b])
        res["training"] = tb.scaling(ref, fit2)
        res["training"]["weights_identical_1_vs_2_workers"] = tb.same_weights(first, tb.weights(ens2))
        res["training"]["weights_identical_1_vs_1_worker"] = tb.same_weights(first, tb.weights(ens_b))
        if "plain" not in skip:
            plain.append(tb.plain_part(ens_b, size, 1))
        if "deletion" not in skip:
            rounds_b = [deletion_bench.single_round(ens_b, rng) for _ in range(2)]
        log(
            f"[bench] fit: {fit_a['wall_seconds']:.1f} s and {fit_b['wall_seconds']:.1f} s on 1 worker, "
            f"{fit2['wall_seconds']:.1f} s on 2"
        )
        if "plain" not in skip:
            res["training"].update(tb.versus_plain_loop(plain, ref))
            log(f"[bench] framework / plain loop: {res['training']['framework_vs_plain']:.3f}")
        if "deletion" not in skip:
            one = deletion_bench.single(ens_b, [(fit_a, rounds_a), (fit_b, rounds_b)], rows0)
            res["deletion"]["single"] = one
            log(
                f"[bench] one deletion: {one['speedup_vs_full_ensemble']:.2f}x of bound {one['bound_real_partition']:.2f}x"
            )
            res["deletion"]["batched"] = deletion_bench.batched(ens_b, size.batch_ks, fit_b, one, rng)
            log(
                "[bench] K batched: "
                + ", ".join(f"K={b['k']}: {b['measured_over_expected']:.3f}" for b in res["deletion"]["batched"])
            )
            ens_b.close()
            if "tracking" not in skip:
                res["deletion"]["tracked"] = deletion_bench.tracked(ens_b.workdir.path, size.tracked_deletions, rng)
                log(f"[bench] tracked deletion overhead: {res['deletion']['tracked']['overhead_seconds']}")
        if "monolithic" not in skip:
            mono = res["training"]["monolithic"] = tb.monolithic(size, data, tmp)
            log(f"[bench] monolithic fit: {mono['wall_seconds']:.1f} s")
            if "single" in res["deletion"]:
                one = res["deletion"]["single"]
                res["deletion"]["vs_monolithic"] = ratio(mono["wall_seconds"], one["expected_seconds"])
                res["deletion"]["cpu_vs_monolithic"] = ratio(mono["cpu_seconds"], one["expected_cpu_seconds"])
        if "inference" not in skip:
            res["inference"] = inference_bench.run(ens2, data[1][0], size.inference_rows)
            log(
                f"[bench] predict_proba / forwards: {[round(b['proba_over_forwards'], 3) for b in res['inference']['by_rows']]}"
            )
        if "accuracy" not in skip:
            res["accuracy"]["digits"] = accuracy_bench.sweep("digits", size, size.digits_seeds, tmp)
            res["accuracy"]["synthetic"] = accuracy_bench.sweep("synthetic", size, size.synthetic_seeds, tmp)
            log(f"[bench] digits gap S=5 vs S=1: {res['accuracy']['digits'].get('gap_pp_s5_vs_s1')}")
            res["precision_accuracy"] = {  # the accuracy cost of training.precision: bf16-mixed
                name: accuracy_bench.precision_cost(name, size, seeds, tmp)
                for name, seeds in (("digits", size.digits_seeds), ("synthetic", size.synthetic_seeds))
            }
            log(
                "[bench] bf16-mixed - fp32 accuracy (pp): "
                + ", ".join(f"{k} {v['bf16_minus_fp32_pp']['mean']:+.2f}" for k, v in res["precision_accuracy"].items())
            )
        if "cli" not in skip:
            repeats = 1 if size_name == "smoke" else 3
            res["cli"] = cli_bench.run(ens2.workdir.path, int(data[0][2][0]), data[1][0], repeats)
            times = ", ".join(f"{k} {v['seconds']:.2f}" for k, v in res["cli"]["commands"].items())
            log(f"[bench] small commands, seconds: {times}")
        if "add" not in skip:  # continual data: append vs canonical vs refit-every-time (add_bench, in-process)
            from benchmarks import add_bench

            res["add"] = add_bench.run("smoke" if size_name == "smoke" else "full", out, log=log)
            s = res["add"]["summary"]
            log(
                f"[bench] additions / refits, sample-epochs: append {s['append']['add_over_refit']:.2f}, "
                f"canonical {s['canonical']['add_over_refit']:.2f}"
            )
        if "placement" not in skip:  # deletion-aware placement vs uniform (placement_bench, in-process)
            from benchmarks import placement_bench

            res["placement"] = placement_bench.run("smoke" if size_name == "smoke" else "full", out, log=log)
            s = res["placement"]["summary"]
            log(
                "[bench] expected cost per request / uniform, skewed prior: "
                + ", ".join(f"{p} {s[p]['skewed']['expected_over_uniform']:.2f}" for p in placement_bench.STRATEGIES)
            )
        if "overhead" not in skip:  # a deletion's fixed costs at S=64, by phase (overhead_bench)
            from benchmarks import overhead_bench

            res["overhead"] = overhead_bench.run(size_name, out, repeats=1 if size_name == "smoke" else 3, log=log)
            f = {k: res["overhead"][k]["fraction_of_compute"] for k in ("tracking_off", "tracking_on")}
            log(
                "[bench] fixed cost / retraining compute, median: to effective "
                f"{f['tracking_off']['fixed_to_effective']['median']:.3f} (off), "
                f"{f['tracking_on']['fixed_to_effective']['median']:.3f} (MLflow); to done "
                f"{f['tracking_on']['fixed_to_done']['median']:.3f} (MLflow)"
            )
        ens2.close()
    finally:
        torch.set_num_threads(threads)
        res["suite_seconds"] = time.perf_counter() - t0
        res["machine_end"] = machine()
        write(res, out)
        shutil.rmtree(tmp, ignore_errors=True)
        if started:
            import ray

            reset_workers()
            ray.shutdown()
    return res


def write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=_plain))
    if "workload" not in res:
        return
    (out / "results.md").write_text(report.markdown(res))
    for name, plot in report.PLOTS.items():
        png = plot(res)
        if png:
            (out / name).write_bytes(png)


def update_readme(out: Path, readme: Path = ROOT / "README.md", docs: Path = ROOT / "docs" / "bench") -> None:
    """Copy the plots to docs/bench/ and put the table and the plots between the README's markers."""
    docs.mkdir(parents=True, exist_ok=True)
    pngs = [n for n in report.PLOTS if (out / n).exists()]
    for name in pngs:
        shutil.copyfile(out / name, docs / name)
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers; add them where the table belongs")
    body = (out / "results.md").read_text().strip() + "\n\n" + "\n".join(f"![{n[:-4]}](docs/bench/{n})" for n in pngs)
    head, rest = text.split(START, 1)
    readme.write_text(head + START + "\n" + body + "\n" + END + rest.split(END, 1)[1])


def _plain(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="full (about 10 min on 2 cores), quick, smoke")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    p.add_argument("--skip", action="append", default=[], choices=PHASES, help="leave out a phase (repeatable)")
    p.add_argument(
        "--update-readme", action="store_true", help="copy plots to docs/bench/ and rewrite the README table"
    )
    p.add_argument(
        "--precision",
        choices=["32-true", "bf16-mixed"],
        default="32-true",
        help="training.precision of the timing workload's fits (the deletion and scaling figures)",
    )
    a = p.parse_args(argv)
    run(a.size, a.out, a.skip, precision=a.precision)
    print((a.out / "results.md").read_text())
    if a.update_readme:
        update_readme(a.out)
        print(f"README.md and docs/bench/ updated from {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
