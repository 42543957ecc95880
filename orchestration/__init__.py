"""Where shards run: a warm Ray actor pool (local or an existing cluster) or in-process for debugging."""

from orchestration.base import Executor, ShardPlan
from orchestration.inprocess import InProcessExecutor
from orchestration.ray_executor import RayExecutor

__all__ = ["Executor", "ShardPlan", "InProcessExecutor", "RayExecutor"]
