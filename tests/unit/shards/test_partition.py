"""Partition: a pure function of (id, seed, S, R); removing rows moves no other row; near balance."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards.errors import DataError
from shards.partition import Placement, _draws, assign, canonical_ids, partition_key, shard_of, split_rows


def test_pure_function_of_id_and_seed():
    ids, _ = canonical_ids(np.array([f"user-{i}" for i in range(500)]))
    a = assign(ids, 7, 5, 4)
    b = assign(ids[::-1].copy(), 7, 5, 4)
    assert all(np.array_equal(x, y[::-1]) for x, y in zip(a, b))
    assert shard_of("user-3", 7, 5, 4) == (a[0][3], a[1][3])
    assert not np.array_equal(a[0], assign(ids, 8, 5, 4)[0]), "the seed changes the partition"


def test_removing_rows_never_moves_others_and_keeps_order():
    ids, _ = canonical_ids(np.arange(2000))
    full = split_rows(ids, 1, 4, 3)
    keep = np.setdiff1d(np.arange(2000), np.arange(0, 2000, 7))
    sub = split_rows(ids[keep], 1, 4, 3)
    for key in full:
        survivors = [i for i in ids[full[key]].tolist() if i % 7 != 0]
        assert ids[keep][sub[key]].tolist() == survivors


def test_shards_are_close_to_balanced():
    ids, _ = canonical_ids(np.arange(20000))
    shard, sl, _ = assign(ids, 0, 8, 4)
    counts = np.bincount(shard, minlength=8)
    assert counts.min() > 0.9 * 20000 / 8 and counts.max() < 1.1 * 20000 / 8
    assert np.bincount(sl, minlength=4).min() > 0.9 * 20000 / 4


def test_int_and_str_ids_are_distinct_and_mixed_ids_rejected():
    assert canonical_ids([1, 2])[1] == "int" and canonical_ids(["1", "2"])[1] == "str"
    with pytest.raises(DataError, match="mix types"):
        canonical_ids(np.array([1, "a"], dtype=object))
    with pytest.raises(DataError, match="int or str"):
        canonical_ids(np.array([1.5, 2.5]))


@settings(max_examples=60, deadline=None)
@given(
    st.one_of(
        st.lists(st.integers(-(2**63), 2**63 - 1), unique=True, max_size=40),
        st.lists(
            st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12), unique=True, max_size=40
        ),
    ),
    st.integers(0, 2**31),
    st.integers(1, 70),
    st.integers(1, 9),
    st.sampled_from(["uniform", "late_slices", "isolated_shards"]),
)
def test_the_batched_assignment_is_the_per_id_one(ids, seed, shards, slices, kind):
    """`assign` (one keyed hasher copied per id, words read in one go) gives each id what `shard_of` and
    the per-id draws give it: the place and rank that every entry point agrees on."""
    risk = [(k % 3) / 2 for k in range(len(ids))]
    placement = Placement(kind, 0.4, 1 + shards // 3)
    shard, sl, rank = assign(ids, seed, shards, slices, risk, placement)
    key = partition_key(seed)
    for k, i in enumerate(ids):
        assert (shard[k], sl[k]) == shard_of(i, seed, shards, slices, risk[k], placement)
        assert rank[k] == _draws(i, key)[2]
