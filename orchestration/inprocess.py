"""Runs every shard in this process, one after another. For debugging: no Ray, same weights."""

from __future__ import annotations

from collections.abc import Callable

from orchestration.base import Executor, ShardPlan, StageCallback
from shards.errors import ShardTrainingError, SisaError
from shards.job import StageRunner
from shards.spec import TrainSpec
from shards.storage import Storage


class InProcessExecutor(Executor):
    name = "inprocess"

    def __init__(self):
        self.runner = StageRunner()

    def run(
        self,
        storage: Storage,
        spec: TrainSpec,
        plans: list[ShardPlan],
        on_stage: StageCallback | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[ShardPlan]:
        if meanwhile is not None:  # the stages train in this thread: nothing to overlap with
            meanwhile()
        try:
            self._run(storage, spec, plans, on_stage)
        finally:
            self.runner.finish()  # the stages' checkpoints durable before the caller commits; no cached row left
        return plans

    def _run(self, storage: Storage, spec: TrainSpec, plans: list[ShardPlan], on_stage: StageCallback | None) -> None:
        for plan in plans:
            while plan.next_stage <= plan.stages(spec):
                try:
                    entry, metrics = self.runner.run(
                        storage, plan.spec(spec), plan.shard, plan.next_stage, plan.slices, plan.last
                    )
                except SisaError as e:
                    raise e.add_detail(shard=plan.shard, stage=plan.next_stage) from None
                except Exception as e:
                    raise ShardTrainingError(
                        f"shard {plan.shard} failed at stage {plan.next_stage}: {type(e).__name__}: {e}",
                        shard=plan.shard,
                        stage=plan.next_stage,
                    ) from e
                plan.record(entry, metrics)
                if on_stage:
                    on_stage(plan, entry, metrics)

    def drop_caches(self) -> None:
        self.runner.drop_cache()
