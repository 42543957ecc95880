"""The cost formulas of deletion-aware placement against brute-force enumeration, and the placement
function itself (pure in (id, seed, risk), the same draws as the uniform one)."""

import numpy as np
import pytest

from shards.partition import Placement, assign, candidates
from sisa import costmodel

EPOCHS = (3, 1, 2, 2)


def _brute(rows_of, risk, S, R, eps):
    """sum_i risk_i * cost(delete row i alone) / sum risk, each row priced by `plan_cost` on the real sizes."""
    sizes = [[0] * R for _ in range(S)]
    for s, j in rows_of:
        sizes[s][j] += 1
    total = sum(r * costmodel.plan_cost(sizes, eps, {s: j + 1})["sample_epochs"] for (s, j), r in zip(rows_of, risk))
    return total / sum(risk), sizes


@pytest.mark.parametrize("kind", ["uniform", "late_slices", "isolated_shards"])
def test_expected_prior_equals_enumeration(kind):
    rng = np.random.default_rng(7)
    S, R, n = 4, 4, 300
    risk = np.where(rng.random(n) < 0.1, rng.uniform(0.2, 0.9, n), rng.uniform(0.0, 0.05, n))
    p = Placement(kind, 0.2, 1)
    shard, sl, _ = assign(np.arange(n), 5, S, R, risk, p)
    brute, sizes = _brute(list(zip(shard.tolist(), sl.tolist())), risk, S, R, EPOCHS)
    weights = [[float(risk[(shard == s) & (sl == j)].sum()) for j in range(R)] for s in range(S)]
    assert costmodel.expected_prior(sizes, EPOCHS, weights) == pytest.approx(brute, rel=1e-12)
    uniform, _ = _brute(list(zip(shard.tolist(), sl.tolist())), np.ones(n), S, R, EPOCHS)
    assert costmodel.expected_single(sizes, EPOCHS) == pytest.approx(uniform, rel=1e-12)


@pytest.mark.parametrize("kind", ["uniform", "late_slices", "isolated_shards"])
@pytest.mark.parametrize("q, p", [(0.1, 0.8), (0.1, 0.1), (0.25, 0.5)])
def test_analytic_formula_equals_enumeration_on_a_balanced_partition(kind, q, p):
    """Rows laid out exactly as the formula assumes (no hash noise): the formula is the enumeration."""
    S, R, k, n = 4, 4, 2, 480
    n_hi = int(q * n)
    rows_of, risk = [], []
    for i in range(n):
        hi = i < n_hi
        if kind == "late_slices":
            slot = (i % S, R - 1) if hi else ((i - n_hi) % S, ((i - n_hi) // S) % (R - 1))
        elif kind == "isolated_shards":
            slot = (S - k + i % k, (i // k) % R) if hi else ((i - n_hi) % (S - k), ((i - n_hi) // (S - k)) % R)
        else:
            slot = (i % S, (i // S) % R)
        rows_of.append(slot)
        risk.append(p / n_hi if hi else (1 - p) / (n - n_hi))
    brute, _ = _brute(rows_of, risk, S, R, EPOCHS)
    formula = costmodel.expected_placement(kind, n, S, R, EPOCHS, q, p, isolated=k)
    if kind == "uniform":  # the formula mixes likely and unlikely rows evenly, as hashing does on average
        brute = _brute(rows_of, np.ones(n), S, R, EPOCHS)[0]
    assert formula == pytest.approx(brute, rel=1e-9)


def test_skewed_prior_against_the_uniform_bound():
    """10% of rows, 80% of requests, S=8, R=8, the paper's schedule: late_slices at most 0.5x uniform and
    1.04x with requests uniform after all (the wrong prior); isolated_shards (3 shards) 0.50x and 1.32x;
    late_slices with R=4 only 0.68x (a likely request still retrains the last stage on the whole shard)."""
    eps, n = (2,) * 8, 8000
    uni = costmodel.expected_placement("uniform", n, 8, 8, eps, 0.1, 0.8)
    ratio = {
        (kind, p): costmodel.expected_placement(kind, n, 8, 8, eps, 0.1, p, 3) / uni
        for kind in ("late_slices", "isolated_shards")
        for p in (0.8, 0.1)
    }
    assert ratio[("late_slices", 0.8)] == pytest.approx(0.4751, abs=1e-4) and ratio[("late_slices", 0.1)] < 1.05
    assert ratio[("isolated_shards", 0.8)] == pytest.approx(0.5013, abs=1e-4)
    assert ratio[("isolated_shards", 0.1)] == pytest.approx(1.3227, abs=1e-4)
    u4 = costmodel.expected_placement("uniform", n, 8, 4, (2,) * 4, 0.1, 0.8)
    assert costmodel.expected_placement("late_slices", n, 8, 4, (2,) * 4, 0.1, 0.8) / u4 == pytest.approx(0.6827, abs=1e-4)


def test_placement_is_pure_in_id_seed_and_risk():
    ids = np.array([f"u-{i}" for i in range(400)])
    risk = np.where(np.arange(400) % 7 == 0, 0.5, 0.01)
    base = assign(ids, 3, 5, 4)
    for p in (Placement("late_slices", 0.1), Placement("isolated_shards", 0.1, 2)):
        shard, sl, rank = assign(ids, 3, 5, 4, risk, p)
        assert np.array_equal(rank, base[2])  # the in-slice order is the uniform one
        sub = assign(ids[::3], 3, 5, 4, risk[::3], p)  # other rows gone: nobody moves
        assert np.array_equal(sub[0], shard[::3]) and np.array_equal(sub[1], sl[::3])
        likely = risk >= 0.1
        if p.kind == "late_slices":
            assert (sl[likely] == 3).all() and (sl[~likely] < 3).all()
        else:
            assert (shard[likely] >= 3).all() and (shard[~likely] < 3).all()
        assert all((s, j) in candidates(i, 3, 5, 4, p) for i, s, j in zip(ids, shard, sl))


def test_realised_cost_over_the_history():
    receipts = [
        {"request_id": "a", "kind": "delete", "rows_deleted": 1, "cost": {"sample_epochs": 100, "expected_sample_epochs": 80}},
        {"request_id": "b", "kind": "add", "cost": {"sample_epochs": 999}},
        {"request_id": "c", "kind": "delete", "rows_deleted": 2, "cost": {"sample_epochs": 60, "expected_sample_epochs": 120}},
        {"request_id": None, "kind": "delete", "cost": {}},
    ]
    r = costmodel.realised(receipts)
    assert r == {
        "requests": 2,
        "rows": 3,
        "mean_sample_epochs": 80.0,
        "mean_expected_sample_epochs": 100.0,
        "realised_over_expected": 0.8,
    }
    assert costmodel.realised([])["mean_sample_epochs"] is None
