"""The worker pool asks the cluster's capacity (a round trip to Ray's GCS, 1-5 ms) only when too few warm
workers are free: a deletion on warm workers does not pay it."""

import pytest

from orchestration import pool


class Asked(Exception):
    pass


def test_enough_free_workers_are_lent_without_asking_the_capacity():
    key = ("test-pool-limit", 1.0, 0.0, 1)
    warm = [object(), object()]
    pool.give_back(key, warm)

    def limit():
        raise Asked

    try:
        assert pool.borrow(key, 2, limit, object) == warm
        pool.give_back(key, warm)
        with pytest.raises(Asked):
            pool.borrow(key, 3, limit, object)
    finally:
        with pool._lock:
            pool._free.pop(key, None)
