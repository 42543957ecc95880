"""Smoke test of the benchmark suite: its smallest size end to end on the session's real Ray.

No timing asserts (CI machines are noisy); it checks that every phase runs, that the figures, table and
plots are written, and the facts the suite relies on: the workers train exactly the sample-epochs the
cost model predicts, and fits on 1 and 2 workers give identical weights.
"""

import json

import pytest

from benchmarks import report
from benchmarks import run as bench


@pytest.mark.slow
def test_benchmark_suite_smoke(ray_session, tmp_path):
    out = tmp_path / "out"
    bench.run("smoke", out, log=lambda *a: None)
    res = json.loads((out / "results.json").read_text())

    tr, de = res["training"], res["deletion"]
    assert tr["weights_identical_1_vs_2_workers"] is True and tr["weights_identical_1_vs_1_worker"] is True
    assert len(tr["fit_1_worker"]["runs"]) == 2
    assert tr["fit_1_worker"]["sample_epochs"] == tr["fit_1_worker"]["analytic_sample_epochs"]
    assert tr["plain_loop"]["sample_epochs"] > 0 and tr["framework_vs_plain"] > 0
    runs = de["single"]["runs"] + [b for b in de["batched"] if not b.get("stratified")] + de["tracked"]["runs"]
    for r in de["single"]["runs"] + de["tracked"]["runs"]:
        assert r["retrained_sample_epochs"] == r["receipt_sample_epochs"], r
    assert de["single"]["rounds"] == 4 and len(de["single"]["window_speedups_over_bound"]) == 2
    assert [r["slice"] for r in de["single"]["runs"]] == list(range(1, res["workload"]["slices"] + 1)) * 4
    assert [b["k"] for b in de["batched"]] == [1, 4]
    assert all(b["measured_sample_epochs"] > 0 and b["expected_sample_epochs"] > 0 for b in de["batched"])
    assert all(r["overhead_seconds"] < r["wall_seconds"] for r in runs if "wall_seconds" in r)
    assert de["single"]["bound_real_partition"] > 1
    assert res["inference"]["by_rows"][0]["path"] == "fused"
    assert set(res["accuracy"]) == {"digits", "synthetic"}
    for a in res["precision_accuracy"].values():  # bf16-mixed's accuracy cost: both precisions, every seed
        assert [len(v["values"]) for v in a["accuracy"].values()] == [len(a["seeds"])] * 2
    assert all(e["plain_over_fast_bf16"] > 0 and e["bf16_gemm_gflops"] > 0 for e in res["engine"].values())
    cli = res["cli"]["commands"]
    assert set(cli) == {"status", "locate", "delete --dry-run", "predict"} and all(
        c["seconds"] > 0 for c in cli.values()
    )
    for name in ("status", "locate", "delete --dry-run"):  # read-only: no Ray, Lightning or torch
        assert not {"ray", "pytorch_lightning", "lightning", "torch"} & set(cli[name]["imports"]), cli[name]
    assert "ray" not in cli["predict"]["imports"]
    ov = res["overhead"]
    for run in ("tracking_off", "tracking_on"):
        o = ov[run]
        assert o["fraction_of_compute"]["fixed_to_done"]["n"] == 1 and o["retrain_compute_seconds"]["min"] > 0
        assert {"ledger_commit", "exclude", "slice_rewrite", "swap", "store_purge", "retrain_compute"} <= set(
            o["phase_seconds_median"]
        )
        assert "eval_rewrite" not in o["phase_seconds_median"], "no held-out row named: the file is not rewritten"
    assert ov["tracking_on"]["phase_seconds_median"]["mlflow_publish"] > 0
    assert ov["queue"]["settled"] == 1 and (out / "overhead.md").exists()
    q = ov["queue"]
    assert 0 < q["settle_to_done_seconds"] < q["settle_seconds"], "done, then the bookkeeping behind it"
    assert q["fixed_to_done_per_request"] < q["fixed_to_logged_per_request"]

    table = (out / "results.md").read_text()
    for needle in (
        "analytic bound",
        "K=4 ids",
        "plain torch loop",
        "2 Ray workers",
        "tracking on",
        "predict_proba",
        "on digits",
        "fixed cost to effective",
        "settled in one batch",
        "precision: bf16-mixed",
        "bf16-mixed` − `32-true`",
    ):
        assert needle in table, needle
    for name in report.PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n{bench.START}\nold table\n{bench.END}\nafter\n")
    bench.update_readme(out, readme=readme, docs=tmp_path / "docs")
    text = readme.read_text()
    assert "old table" not in text and "| figure | target |" in text and text.endswith(f"{bench.END}\nafter\n")
    assert (tmp_path / "docs" / "speedup.png").exists()


def test_update_readme_needs_markers(tmp_path):
    (tmp_path / "results.md").write_text("| figure |\n")
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        bench.update_readme(tmp_path, readme=readme, docs=tmp_path / "docs")


def test_add_benchmark_smoke(tmp_path):
    """The continual-data benchmark at its smallest: every figure it reports, the invariants it checks."""
    from benchmarks import add_bench

    res = add_bench.run("smoke", tmp_path, log=lambda *a: None)
    s, inv = res["summary"], res["invariants"]
    batches = add_bench.SIZES["smoke"]["batches"]
    for p in add_bench.PLACEMENTS:
        assert len(res[p]["steps"]) == len(s[p]["cumulative_sample_epochs"]) == batches
        assert s[p]["measured_equals_receipt"], "the workers train exactly what the receipt says"
        assert s[p]["within_10_percent"], s[p]["max_deviation_from_expected"]
        assert all(x["estimate_sample_epochs"] == x["receipt_sample_epochs"] for x in res[p]["steps"])
    assert s["append"]["add_sample_epochs"] < s["canonical"]["add_sample_epochs"] <= s["refit"]["sample_epochs"]
    assert res["append"]["steps"][-1]["stages"] == [4 + batches] * 4, "one appended stage per batch and shard"
    assert any(x.get("delete_appended_sample_epochs", 0) > 0 for x in res["append"]["steps"])
    assert inv["canonical_equals_fit_of_live_rows"] and inv["append_equals_replay"]
    assert inv["compaction"]["equals_fit_of_live_rows"]
    assert inv["compaction"]["measured_sample_epochs"] == inv["compaction"]["estimate_sample_epochs"]
    assert s["canonical"]["final_accuracy"] == inv["fit_of_live_rows_accuracy"]
    assert (tmp_path / "add_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_placement_benchmark_smoke(tmp_path):
    """The deletion-aware placement benchmark at its smallest: the workers train exactly what each receipt
    and estimate say, every figure is there, and the placements put the skewed prior's cost below uniform's."""
    from benchmarks import placement_bench

    res = placement_bench.run("smoke", tmp_path, log=lambda *a: None)
    s = res["summary"]
    k = placement_bench.SIZES["smoke"]["requests"]
    for p in placement_bench.STRATEGIES:
        for sc in ("skewed", "uniform"):
            assert len(res[p][sc]) == k
            assert s[p][sc]["measured_equals_receipt"], "workers' count == receipt == estimate"
            assert s[p][sc]["expected"] > 0 and s[p][sc]["measured"] > 0
        assert 0 <= s[p]["accuracy"] <= 1
    assert sum(x["likely"] for x in res["uniform"]["skewed"]) == round(0.8 * k)
    for p in ("late_slices", "isolated_shards"):
        assert s[p]["skewed"]["expected_over_uniform"] < 0.8
    assert (tmp_path / "placement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_base_benchmark_smoke(tmp_path):
    """The base-data benchmark at its smallest: every variant at each S, the workers train exactly what the
    receipts say (the base stage is never part of a deletion; heads on a frozen encoder train the same
    sample-epochs as whole sub-models), the table and the plot are written."""
    from benchmarks import base_bench

    res = base_bench.sweep("digits", [0], (1, 3), tmp_path, deletions=1, epochs=4, log=lambda *a: None)
    for kind in ("plain", "base", "encoder"):
        assert list(res[kind]) == ["1", "3"]
        for r in res[kind].values():
            assert r["measured_equals_receipt"] and r["delete_sample_epochs"]["mean"] > 0
            assert 0 < r["accuracy"]["mean"] <= 1
    assert 0 < res["one_model"]["mean"] <= 1 and 0 < res["start_alone"]["mean"] <= 1
    for S in ("1", "3"):
        assert res["encoder"][S]["delete_sample_epochs"] == res["base"][S]["delete_sample_epochs"]
    assert "| digits | 3 |" in base_bench.table([res])
    base_bench.plot([res], tmp_path / "base.png")
    assert (tmp_path / "base.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
