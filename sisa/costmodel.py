"""The analytic cost model of SISA (Bourtoule et al. 2021), in sample-epochs.

One implementation shared by `estimate_deletion_cost` and the benchmarks. Stage i of shard s trains on
slices 1..i for e_i epochs: c_{s,i} = e_i * (d_{s,1} + ... + d_{s,i}); retraining from stage r costs
C_{s,r} = sum_{i>=r} c_{s,i}. Stages are 1-based here, as in the paper.
"""

from __future__ import annotations


def stage_costs(slice_rows: list[int], epochs: tuple[int, ...]) -> list[int]:
    out, seen = [], 0
    for d, e in zip(slice_rows, epochs):
        seen += d
        out.append(e * seen)
    return out


def retrain_cost(slice_rows: list[int], epochs: tuple[int, ...], start_stage: int) -> int:
    """C_{s,r}: sample-epochs to retrain a shard from stage ``start_stage`` (1-based) to the end."""
    return sum(stage_costs(slice_rows, epochs)[start_stage - 1 :])


def full_cost(rows: list[list[int]], epochs: tuple[int, ...]) -> int:
    """Sample-epochs of training the whole ensemble; ``rows[s][j]`` is the size of slice j of shard s."""
    return sum(retrain_cost(r, epochs, 1) for r in rows)


def expected_single(rows: list[list[int]], epochs: tuple[int, ...]) -> float:
    """Exact expected cost of deleting one uniformly chosen row: (1/N) sum_rows C_{shard,slice}."""
    n = sum(map(sum, rows))
    total = sum(d * retrain_cost(r, epochs, j + 1) for r in rows for j, d in enumerate(r))
    return total / max(1, n)


def expected_batched(rows: list[list[int]], epochs: tuple[int, ...], k: int) -> float:
    """Expected cost of K uniform, independent requests served in one batch (each shard retrained once,
    from its earliest affected stage)."""
    n = sum(map(sum, rows))
    total = 0.0
    for r in rows:
        R = len(r)
        before = [sum(r[:j]) / n for j in range(R + 1)]  # P(one request hits this shard before slice j)
        for stage in range(1, R + 1):
            p = (1 - before[stage - 1]) ** k - (1 - before[stage]) ** k
            total += p * retrain_cost(r, epochs, stage)
    return total


def expected_speedup(rows: list[list[int]], epochs: tuple[int, ...]) -> float:
    """Full retrain over the expected cost of one uniform deletion, for the real partition and schedule
    (the exact counterpart of `speedup_bound`)."""
    e = expected_single(rows, epochs)
    return full_cost(rows, epochs) / e if e else float("inf")


def expected_sequential(rows: list[list[int]], epochs: tuple[int, ...], k: int) -> float:
    """Expected cost of K uniform requests served one at a time (each retrains its own shard): K * E[C]."""
    return k * expected_single(rows, epochs)


def speedup_bound(shards: int, slices: int) -> float:
    """S * 3R / (2R + 1): one deletion vs a full retrain, with equal shards and the paper's schedule."""
    return shards * 3 * slices / (2 * slices + 1)


def plan_cost(rows: list[list[int]], epochs: tuple[int, ...], start: dict[int, int]) -> dict:
    """Cost of a concrete plan ``{shard: first stage to retrain}`` against a full retrain."""
    retrain = sum(retrain_cost(rows[s], epochs, r) for s, r in start.items())
    full = full_cost(rows, epochs)
    return {
        "sample_epochs": retrain,
        "full_retrain_sample_epochs": full,
        "fraction_of_full": retrain / full if full else 0.0,
        "speedup": full / retrain if retrain else float("inf"),
    }


# -- additions (`SisaEnsemble.add`) -----------------------------------------------------------------------
# Canonical placement: a new row lands in the shard, slice and rank its id hashes to, so an addition is
# priced exactly like a deletion: each shard it lands in retrains from its earliest affected stage, and the
# plan's cost is `plan_cost` on the partition *after* the addition. Append placement: the batch forms one
# more slice at the end of each shard it lands in; that stage trains on all of the shard's slices so far,
# cumulative like every SISA stage, for e_a epochs: C = e_a * (rows of the shard after the addition).


def expected_addition(rows_after: list[list[int]], epochs: tuple[int, ...], k: int) -> float:
    """Expected cost of adding K rows with uniformly hashed ids (canonical placement): the same formula as
    deleting K uniform rows, `expected_batched`, on the partition after the addition."""
    return expected_batched(rows_after, epochs, k)


def append_cost(rows_after: list[list[int]], epochs: list[tuple[int, ...]], shards: list[int]) -> dict:
    """Cost of an append-placement addition that appended one stage to each of ``shards``; ``rows_after``
    and ``epochs`` are per shard (each shard's own stage count), the appended stage last."""
    work = sum(epochs[s][-1] * sum(rows_after[s]) for s in shards)
    full = sum(retrain_cost(r, e, 1) for r, e in zip(rows_after, epochs))
    return {
        "sample_epochs": work,
        "full_retrain_sample_epochs": full,
        "fraction_of_full": work / full if full else 0.0,
        "speedup": full / work if work else float("inf"),
    }
