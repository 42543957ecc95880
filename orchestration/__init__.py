"""Where shards run: a warm Ray actor pool (local or an existing cluster) or in-process for debugging.

The executors resolve on first use (PEP 562): importing this package (e.g. for `ShardPlan`) imports
neither Ray nor torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from orchestration.base import Executor, ShardPlan

if TYPE_CHECKING:
    from orchestration.inprocess import InProcessExecutor
    from orchestration.ray_executor import RayExecutor

__all__ = ["Executor", "ShardPlan", "InProcessExecutor", "RayExecutor"]
_LAZY = {"InProcessExecutor": "orchestration.inprocess", "RayExecutor": "orchestration.ray_executor"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
