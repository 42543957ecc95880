"""A batch run's request-id tag: the longest run of whole ids, from the first, that fits MLflow's limit."""

from hypothesis import given
from hypothesis import strategies as st

from sisa.tracking.runs import capped

ids = st.lists(st.text(alphabet="0123456789abcdefT-", min_size=1, max_size=24), max_size=40)


@given(ids, st.integers(0, 300))
def test_capped_is_the_longest_prefix_of_whole_ids_that_fits(rids, limit):
    got = capped(rids, limit)
    k = len(got.split(",")) if got else 0
    assert len(got) <= limit and got == ",".join(rids[:k])
    assert k == len(rids) or len(",".join(rids[: k + 1])) > limit
