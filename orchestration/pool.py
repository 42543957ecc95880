"""A process-wide pool of warm shard-worker actors, shared by every ensemble in this driver.

Workers are keyed by what makes them interchangeable (resources and torch threads). An executor borrows
the workers it needs for one run and gives them back, so two ensembles in one process never ask Ray
for more than the cluster holds, and a later fit or deletion finds its workers already warm.
"""

from __future__ import annotations

import threading

import ray

from shards.errors import ShardTrainingError

_lock = threading.Condition()
_free: dict[tuple, list] = {}
_count: dict[tuple, int] = {}


def _new(key: tuple, worker_cls):
    num_cpus, num_gpus, threads = key[1:]
    cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(worker_cls)
    return cls.remote(threads)


def borrow(key: tuple, wanted: int, limit, worker_cls, ready_timeout: float = 120.0) -> list:
    """Up to ``wanted`` warm workers (at least one), creating new ones while under ``limit``: a number, or a
    function that gives it, asked only when too few workers are free (the cluster's capacity costs a round
    trip to Ray's GCS, 1-5 ms, in front of every deletion)."""
    with _lock:
        free = _free.setdefault(key, [])
        if wanted > 0 and len(free) >= wanted:
            take = free[:wanted]
            del free[:wanted]
            return take
    if callable(limit):
        limit = limit()
    with _lock:
        while True:
            free = _free.setdefault(key, [])
            room = limit - _count.get(key, 0)
            if free or room > 0:
                take = free[: min(wanted, limit)]
                del free[: len(take)]
                new = min(wanted - len(take), max(0, room))
                _count[key] = _count.get(key, 0) + new
                break
            _lock.wait()
    fresh = [_new(key, worker_cls) for _ in range(new)]
    if fresh:
        pings = {a.ping.remote(): a for a in fresh}
        _, not_ready = ray.wait(list(pings), num_returns=len(pings), timeout=ready_timeout)
        for ref in not_ready:
            discard(key, pings[ref])
        fresh = [a for ref, a in pings.items() if ref not in not_ready]
    got = take + fresh
    if not got:
        raise ShardTrainingError(
            f"no shard worker could be placed within {ready_timeout:.0f}s: the Ray cluster has no free "
            f"{key[1]} CPU / {key[2]} GPU slot. Lower resources.num_cpus, or free or add nodes"
        )
    return got


def give_back(key: tuple, actors: list) -> None:
    with _lock:
        _free.setdefault(key, []).extend(actors)
        _lock.notify_all()


def discard(key: tuple, actor) -> None:
    """Forget a dead or unplaceable worker."""
    try:
        ray.kill(actor)
    except Exception:
        pass
    with _lock:
        _count[key] = max(0, _count.get(key, 0) - 1)
        _lock.notify_all()


def try_new(key: tuple, limit: int, worker_cls, timeout: float):
    """A fresh worker if the cluster can place one within ``timeout`` seconds, else None."""
    with _lock:
        if _count.get(key, 0) >= limit:
            return None
        _count[key] = _count.get(key, 0) + 1
    actor = _new(key, worker_cls)
    ready, _ = ray.wait([actor.ping.remote()], timeout=timeout)
    if ready:
        try:
            ray.get(ready[0])
            return actor
        except Exception:
            pass
    discard(key, actor)
    return None


def all_free(key: tuple) -> list:
    with _lock:
        return list(_free.get(key, []))


def release_idle() -> None:
    """End every worker no run has borrowed (they hold CPUs; the next run starts fresh ones)."""
    with _lock:
        for key, actors in _free.items():
            for a in actors:
                try:
                    ray.kill(a)
                except Exception:
                    pass
            _count[key] = max(0, _count.get(key, 0) - len(actors))
            actors.clear()
        _lock.notify_all()


def shutdown_all() -> None:
    with _lock:
        for actors in _free.values():
            for a in actors:
                try:
                    ray.kill(a)
                except Exception:
                    pass
        _free.clear()
        _count.clear()
