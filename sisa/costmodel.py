"""The analytic cost model of SISA (Bourtoule et al. 2021), in sample-epochs.

One implementation shared by `estimate_deletion_cost` and the benchmarks. Stage i of shard s trains on
slices 1..i for e_i epochs: c_{s,i} = e_i * (d_{s,1} + ... + d_{s,i}); retraining from stage r costs
C_{s,r} = sum_{i>=r} c_{s,i}. Stages are 1-based here, as in the paper.

``epochs`` is one schedule for every shard (a tuple of ints), or one schedule per shard (a list of tuples):
a shard with stages appended by `add` (``sharding.new_rows: append``) has its own, longer schedule
(`Manifest.schedules`).
"""

from __future__ import annotations


def per_shard(epochs, n: int) -> list[tuple[int, ...]]:
    """``epochs`` as one schedule per shard (``n`` shards)."""
    if len(epochs) and isinstance(epochs[0], (tuple, list)):
        return [tuple(e) for e in epochs]
    return [tuple(epochs)] * n


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
    return sum(retrain_cost(r, e, 1) for r, e in zip(rows, per_shard(epochs, len(rows))))


def expected_single(rows: list[list[int]], epochs: tuple[int, ...]) -> float:
    """Exact expected cost of deleting one uniformly chosen row: (1/N) sum_rows C_{shard,slice}."""
    n = sum(map(sum, rows))
    eps = per_shard(epochs, len(rows))
    total = sum(d * retrain_cost(r, e, j + 1) for r, e in zip(rows, eps) for j, d in enumerate(r))
    return total / max(1, n)


def expected_batched(rows: list[list[int]], epochs: tuple[int, ...], k: int) -> float:
    """Expected cost of K uniform, independent requests served in one batch (each shard retrained once,
    from its earliest affected stage)."""
    n = sum(map(sum, rows))
    total = 0.0
    for r, e in zip(rows, per_shard(epochs, len(rows))):
        R = len(r)
        before = [sum(r[:j]) / n for j in range(R + 1)]  # P(one request hits this shard before slice j)
        for stage in range(1, R + 1):
            p = (1 - before[stage - 1]) ** k - (1 - before[stage]) ** k
            total += p * retrain_cost(r, e, stage)
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
    eps = per_shard(epochs, len(rows))
    retrain = sum(retrain_cost(rows[s], eps[s], r) for s, r in start.items())
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
# plan's cost is `plan_cost` on the partition *after* the addition.
#
# Append placement: the batch forms one more slice at the end of each shard it lands in (its id's shard);
# that stage trains on all of the shard's slices so far, cumulative like every SISA stage, for e_a epochs:
#     cost of the addition = sum over the shards it lands in of e_a * n_s',  n_s' = rows of s after it.
# With K uniformly hashed ids over S shards, E[cost] = e_a * sum_s (n_s * (1 - (1 - 1/S)^K) + K/S).
# The appended stages stay in the shard: a later deletion in slice j retrains stages j..last, appended
# ones included. Stage i (> R) of shard s is retrained by a uniform deletion with probability D_{s,i}/N
# (D_{s,i} = rows of slices 1..i) at cost c_{s,i} = e_i * D_{s,i}, so appended stages add
#     sum_s sum_{i>R} e_i * D_{s,i}^2 / N
# sample-epochs to the expected cost of one uniform deletion (`deletion_overhead`); compaction
# (`SisaEnsemble.compact`, cost `full_cost` of the canonical layout) takes it back to zero.


def expected_addition(rows_after: list[list[int]], epochs, k: int) -> float:
    """Expected cost of adding K rows with uniformly hashed ids (canonical placement): the same formula as
    deleting K uniform rows, `expected_batched`, on the partition after the addition."""
    return expected_batched(rows_after, epochs, k)


def append_cost(rows_after: list[list[int]], epochs, shards) -> dict:
    """Cost of an append-placement addition that appended one stage to each of ``shards``; ``rows_after``
    and ``epochs`` are per shard (each shard's own stage count), the appended stage last."""
    eps = per_shard(epochs, len(rows_after))
    work = sum(eps[s][-1] * sum(rows_after[s]) for s in shards)
    full = full_cost(rows_after, eps)
    return {
        "sample_epochs": work,
        "full_retrain_sample_epochs": full,
        "fraction_of_full": work / full if full else 0.0,
        "speedup": full / work if work else float("inf"),
    }


def expected_append(rows_before: list[list[int]], append_epochs: int, k: int) -> float:
    """Expected cost of appending K rows with uniformly hashed ids: e_a * sum_s (n_s (1-(1-1/S)^K) + K/S)."""
    S = len(rows_before)
    hit = 1 - (1 - 1 / S) ** k if S else 0.0
    return append_epochs * sum(sum(r) * hit + k / S for r in rows_before)


def deletion_overhead(rows: list[list[int]], epochs, base_stages: int) -> float:
    """Sample-epochs the stages after the first ``base_stages`` (the appended ones) add to the expected cost
    of one uniform deletion: sum_s sum_{i > R} e_i * D_{s,i}^2 / N."""
    n = sum(map(sum, rows))
    total = 0
    for r, e in zip(rows, per_shard(epochs, len(rows))):
        seen = 0
        for i, (d, ep) in enumerate(zip(r, e), start=1):
            seen += d
            if i > base_stages:
                total += ep * seen * seen
    return total / max(1, n)


def appended_share(rows: list[list[int]], epochs, start: dict[int, int], base_stages: int) -> int:
    """The sample-epochs of a plan ``{shard: first stage}`` spent on stages after the first ``base_stages``
    (the appended ones): what append placement adds to this deletion."""
    eps = per_shard(epochs, len(rows))
    return sum(sum(stage_costs(rows[s], eps[s])[max(r, base_stages + 1) - 1 :]) for s, r in start.items())


# -- deletion priors (`sharding.placement`) ----------------------------------------------------------------
# A request names row i with probability pi_i = risk_i / sum(risk) (the prior of ``fit(..., risk=...)``), so
# the expected cost of one request is sum_i pi_i C_{shard(i), slice(i)} = sum_{s,j} W_{s,j} C_{s,j} / sum W,
# W_{s,j} the summed risk of slice j of shard s (`Manifest.slice_risk`). Uniform requests: W = rows.
#
# For the analytic figures take N rows over S shards, R slices, a share q of rows "likely" (risk >= the
# threshold) receiving a share p of the requests, and balanced hashing (noise ignored; `ideal_partition`):
#   uniform:          every slice N/(S R) rows; E = C averaged over slices = e N/S (R+1)(2R+1)/(6R^2) * R
#                     with the paper's schedule (e per stage), whoever asks: the prior changes nothing;
#   late_slices:      slices 1..R-1 hold (1-q)N/(S(R-1)) rows each, slice R holds qN/S; a likely request
#                     retrains stage R only (e_R N/S), an unlikely one C_j for a uniform j < R:
#                     E = p e_R N/S + (1-p) mean_{j<R} C_j;
#   isolated_shards:  k shards of qN/k rows hold the likely rows, S-k shards of (1-q)N/(S-k) the others;
#                     E = p mean_j C_j(qN/k) + (1-p) mean_j C_j((1-q)N/(S-k)).
# `expected_placement` evaluates these on the ideal partition through `expected_prior`.


def expected_prior(rows: list[list[int]], epochs, weights: list[list[float]]) -> float:
    """Exact expected cost of one request when it names a row with probability proportional to its prior:
    sum_{s,j} W_{s,j} C_{s,j} / sum W (``weights[s][j]``: the summed prior of that slice)."""
    eps = per_shard(epochs, len(rows))
    total = float(sum(map(sum, weights)))
    if total <= 0:
        return expected_single(rows, epochs)
    acc = sum(w * retrain_cost(r, e, j + 1) for r, e, ws in zip(rows, eps, weights) for j, w in enumerate(ws) if w)
    return acc / total


def ideal_partition(kind: str, n: float, shards: int, slices: int, q: float, p: float, isolated: int = 1):
    """(rows, weights) of the balanced partition of ``n`` rows under a placement, a share ``q`` of rows being
    likely and receiving a share ``p`` of the requests (weights sum to 1)."""
    S, R = shards, slices
    lo_w = (1 - p) / ((1 - q) * n) if q < 1 else 0.0  # request probability of one unlikely row
    hi_w = p / (q * n) if q > 0 else 0.0
    if kind == "late_slices" and R > 1:
        lo, hi = (1 - q) * n / (S * (R - 1)), q * n / S
        rows = [[lo] * (R - 1) + [hi] for _ in range(S)]
        weights = [[lo * lo_w] * (R - 1) + [hi * hi_w] for _ in range(S)]
    elif kind == "isolated_shards" and S > isolated:
        k = isolated
        lo, hi = (1 - q) * n / ((S - k) * R), q * n / (k * R)
        rows = [[lo] * R for _ in range(S - k)] + [[hi] * R for _ in range(k)]
        weights = [[lo * lo_w] * R for _ in range(S - k)] + [[hi * hi_w] * R for _ in range(k)]
    else:
        d = n / (S * R)
        rows = [[d] * R for _ in range(S)]
        weights = [[d / n] * R for _ in range(S)]  # hashing mixes likely and unlikely rows evenly
    return rows, weights


def expected_placement(kind: str, n: float, shards: int, slices: int, epochs, q: float, p: float, isolated=1) -> float:
    """Analytic expected cost of one request (sample-epochs) under placement ``kind`` (see above)."""
    rows, weights = ideal_partition(kind, n, shards, slices, q, p, isolated)
    return expected_prior(rows, epochs, weights)


def realised(receipts: list[dict]) -> dict:
    """Realised cost per deletion request over the ledger's history (done deletions that retrained or erased
    rows), against what was expected when each was made (``cost.expected_sample_epochs``, the prior's
    expectation for one row, recorded in receipts of a deletion-aware placement)."""
    dels = [r for r in receipts if r.get("kind", "delete") == "delete" and r.get("request_id")]
    costs = [float((r.get("cost") or {}).get("sample_epochs", 0)) for r in dels]
    exp = [(r.get("cost") or {}).get("expected_sample_epochs") for r in dels]
    exp = [float(e) for e in exp if e is not None]
    mean = sum(costs) / len(costs) if costs else None
    mean_exp = sum(exp) / len(exp) if exp and len(exp) == len(costs) else None
    return {
        "requests": len(dels),
        "rows": sum(int(r.get("rows_deleted", 0)) for r in dels),
        "mean_sample_epochs": mean,
        "mean_expected_sample_epochs": mean_exp,
        "realised_over_expected": mean / mean_exp if mean is not None and mean_exp else None,
    }
