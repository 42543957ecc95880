"""Fixtures only: one real local Ray for the whole session, tiny real data. Helpers: `helpers`."""

from __future__ import annotations

import os

import pytest
from helpers import tiny_data

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


@pytest.fixture
def data():
    return tiny_data()
