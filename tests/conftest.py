"""Shared fixtures: one real local Ray for the whole session, tiny real data and configs."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        tests = os.path.dirname(os.path.abspath(__file__))  # user modules in tests/ must import on workers
        path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            namespace="sisa-tests",
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    yield ray


def tiny_config(**over) -> dict:
    """A small config whose full fit takes about a second."""
    cfg = {
        "name": "tiny",
        "seed": 3,
        "sharding": {"shards": 3, "slices": 3},
        "model": {"name": "mlp", "kwargs": {"hidden": [16], "dropout": 0.1}},
        "training": {"epochs": 4, "batch_size": 16, "lr": 0.01, "lr_gamma": 0.9},
        "tracking": {"enabled": False},
        "cluster": {"executor": "inprocess"},
    }
    for key, val in over.items():
        if isinstance(val, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **val}
        else:
            cfg[key] = val
    return cfg


def tiny_data(n=240, features=6, classes=3, seed=0, str_ids=True):
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=n, n_features=features, n_informative=4, n_redundant=0, n_classes=classes, random_state=seed
    )
    ids = np.array([f"u-{i}" for i in range(n)]) if str_ids else np.arange(1000, 1000 + n)
    return X.astype(np.float32), y, ids


@pytest.fixture
def data():
    return tiny_data()


def weights_equal(a, b) -> bool:
    """Every sub-model tensor identical (torch.equal) and the same set of active shards."""
    import torch

    if a.active_shards() != b.active_shards():
        return False
    for s in a.active_shards():
        sa, sb = a.load_shard_model(s).state_dict(), b.load_shard_model(s).state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True
