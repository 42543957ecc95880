"""Connecting to Ray: a local Ray started for you, or an existing cluster by address."""

from __future__ import annotations

import logging
import os

import ray


def connect(address: str | None = None, num_cpus: int | None = None, namespace: str = "sisa") -> dict:
    """Join ``address`` (or $RAY_ADDRESS), or start a local Ray. Reuses a Ray this process already joined.

    Token auth stays as Ray configures it; set RAY_AUTH_MODE / the token as your cluster requires.
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(namespace=namespace, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": a Ray of our own; without it ray.init joins any Ray already running on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return ray.cluster_resources()


def capacity(num_cpus: float, num_gpus: float) -> int:
    """How many shard workers with these resources the cluster can hold at once (at least 1)."""
    res = ray.cluster_resources()
    slots = []
    if num_cpus:
        slots.append(int(res.get("CPU", 1) // num_cpus))
    if num_gpus:
        slots.append(int(res.get("GPU", 0) // num_gpus))
    return max(1, min(slots) if slots else 1)
