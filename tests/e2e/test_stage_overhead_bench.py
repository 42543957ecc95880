"""benchmarks/stage_overhead_bench.py runs end to end at a tiny size: both pairs train the same
sample-epochs, and the figures it reports are there (no timing asserts)."""

import pytest

from benchmarks import stage_overhead_bench


@pytest.mark.slow
def test_stage_overhead_bench_runs_and_pairs_train_the_same_sample_epochs():
    out = stage_overhead_bench.run(repeats=1, rows=512)
    assert set(out["pairs"]) == {"S16xR1_vs_S256xR1", "S4xR4_vs_S64xR4"}
    for pair in out["pairs"].values():
        assert pair["small"]["stages"] == 16 and pair["large"]["stages"] == 256
        assert pair["small"]["sample_epochs"] == pair["large"]["sample_epochs"] > 0
        assert pair["ratio"] > 0 and pair["ratio_spread"][0] <= pair["ratio"] <= pair["ratio_spread"][1]
    assert out["deletion"]["bound"] > 1 and out["deletion"]["expected_deletion_seconds"] > 0
