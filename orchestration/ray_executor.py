"""Shards on Ray: warm actors borrowed from a process-wide pool, one shard per actor, one call per shard.

Each actor imports torch and Lightning once and caches shard data, so deletions do not pay start-up.
A shard's call is a streaming generator that yields each stage once its checkpoint is written: the
driver takes a stage in (records it, runs its callback) while the worker trains the next, with no round
trip between stages. A call that fails because its worker or node died is re-sent to a fresh actor,
resuming from the last stage checkpoint the driver has seen; errors of our own (corrupt checkpoint, bad
model) are not retried and carry the shard that failed.
"""

from __future__ import annotations

from collections.abc import Callable

import ray
import torch
from ray.exceptions import RayActorError, RayError, RayTaskError

from orchestration import pool
from orchestration.base import Executor, ShardPlan, StageCallback
from orchestration.cluster import capacity, connect
from shards.errors import ShardTrainingError, SisaError
from shards.job import StageRunner
from shards.spec import TrainSpec
from shards.storage import Storage


class ShardWorker:
    """The actor body; kept warm between calls."""

    def __init__(self, threads: int):
        torch.set_num_threads(threads)
        self.runner = StageRunner()

    def run(self, storage, spec, shard, first, last, slices, prev, epochs, finish):
        """Stages ``first``..``last`` of ``shard`` one after another, each yielded once written (a streaming
        generator: the driver takes a stage in while the next one trains). ``finish``: this worker's run
        ends with this shard, so its last stage finishes the run (`StageRunner.finish`)."""
        for stage in range(first, last + 1):
            out = self.runner.run(
                storage, spec.for_stage(epochs, stage), shard, stage, slices, prev, finish and stage == last
            )
            yield out
            prev = out[0]

    def finish(self):
        self.runner.finish()

    def ping(self):
        return True


class RayExecutor(Executor):
    name = "ray"

    def __init__(
        self,
        address=None,
        num_cpus_per_shard=1.0,
        num_gpus_per_shard=0.0,
        max_retries=3,
        local_num_cpus=None,
        max_workers=None,
        threads=1,
    ):
        self.address, self.local_num_cpus = address, local_num_cpus
        self.num_cpus, self.num_gpus = num_cpus_per_shard, num_gpus_per_shard
        self.max_retries, self.max_workers, self.threads = max_retries, max_workers, threads
        self.lost_workers = 0  # workers that died under a running stage (for reports and tests)

    def _key(self) -> tuple:
        if not ray.is_initialized():
            connect(self.address, self.local_num_cpus)
        return (ray.get_runtime_context().gcs_address, self.num_cpus, self.num_gpus, self.threads)

    def run(
        self,
        storage: Storage,
        spec: TrainSpec,
        plans: list[ShardPlan],
        on_stage: StageCallback | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[ShardPlan]:
        todo = [p for p in plans if p.next_stage <= p.stages(spec)]
        if not todo:
            if meanwhile is not None:
                meanwhile()
            return plans
        key = self._key()

        def limit() -> int:
            n = capacity(self.num_cpus, self.num_gpus)
            return min(n, self.max_workers) if self.max_workers else n

        wanted = min(len(todo), self.max_workers) if self.max_workers else len(todo)
        actors = pool.borrow(key, wanted, limit, ShardWorker)
        # actor -> the checkpoint files it wrote in this run, not yet synced; an actor is a key from its first
        # call until a call that finished its run (see `submit`) came back
        written: dict = {}
        try:
            self._drive(key, actors, storage, spec, todo, on_stage, written, meanwhile)
        finally:
            try:
                for actor in _sync(actors, storage, written):
                    actors.remove(actor)
                    pool.discard(key, actor)
            finally:
                pool.give_back(key, actors)
        return plans

    def _drive(self, key, actors, storage, spec, todo, on_stage, written: dict, meanwhile=None):
        """Keep every actor busy; a shard sticks to its actor between stages (warm caches). ``meanwhile``
        runs once the first calls are sent."""
        queue = list(todo)
        free = list(actors)
        pending: dict = {}  # a shard's call (a generator of its stages) -> (actor, plan, finish)

        def submit(actor, plan):
            finish = not queue  # no other shard waits: the worker's run ends with this one
            args = (storage, spec, plan.shard, plan.next_stage, plan.stages(spec), plan.slices, plan.last, plan.epochs)
            pending[actor.run.options(num_returns="streaming").remote(*args, finish)] = (actor, plan, finish)
            written.setdefault(actor, [])

        while queue or pending:
            while queue and free:
                submit(free.pop(0), queue.pop(0))
            if meanwhile is not None:
                meanwhile, then = None, meanwhile
                then()
            if not pending:  # every worker was lost: wait for the cluster to place a new one
                new = pool.try_new(key, capacity(self.num_cpus, self.num_gpus), ShardWorker, timeout=120)
                if new is None:
                    raise ShardTrainingError(
                        f"all shard workers were lost and no new one could be placed; shard {queue[0].shard} is unfinished. "
                        "Add nodes or lower resources.num_cpus, then run again (finished stages are kept)",
                        shard=queue[0].shard,
                    )
                actors.append(new)
                free.append(new)
                continue
            [gen], _ = ray.wait(list(pending), num_returns=1)
            actor, plan, finish = pending[gen]
            try:
                entry, metrics = ray.get(next(gen))
            except RayError as e:
                del pending[gen]
                self._check_retry(e, plan)
                if isinstance(e, RayActorError) or not isinstance(e, RayTaskError):
                    # the worker (or its node) is gone: resume this shard elsewhere from its last checkpoint
                    self.lost_workers += 1
                    actors.remove(actor)
                    pool.discard(key, actor)
                    new = pool.try_new(key, capacity(self.num_cpus, self.num_gpus), ShardWorker, timeout=10)
                    if new is not None:
                        actors.append(new)
                        free.append(new)
                    queue.insert(0, plan)
                else:
                    submit(actor, plan)
                continue
            plan.record(entry, metrics)
            written[actor].append(entry["file"])
            if plan.next_stage > plan.stages(spec):
                del pending[gen]
                free.append(actor)
                if finish:  # its files synced, its cache emptied by its last stage
                    written.pop(actor)
            if on_stage:
                on_stage(plan, entry, metrics)

    def _check_retry(self, e: RayError, plan: ShardPlan) -> None:
        """Raise unless the failed stage call should be retried."""
        cause = getattr(e, "cause", None)
        if isinstance(cause, SisaError):
            raise cause.add_detail(shard=plan.shard, stage=plan.next_stage) from None
        plan.attempts += 1
        if plan.attempts > self.max_retries:
            raise ShardTrainingError(
                f"shard {plan.shard} stage {plan.next_stage} failed {plan.attempts} times, last: "
                f"{type(e).__name__}: {_short(e)}. Check the workers' logs; raise cluster.max_retries if the cluster is flaky",
                shard=plan.shard,
                stage=plan.next_stage,
            ) from e

    def ingest(self, source: str, storage: Storage, **kwargs):
        """Partition on the cluster with Ray Data (`orchestration.ingest`); a deletion-aware placement, which
        needs every row's prior checked in one stream, takes the single-process path."""
        placement = kwargs.get("placement")
        if placement is not None and not placement.uniform:
            return super().ingest(source, storage, **kwargs)
        from orchestration.ingest import ray_ingest

        self._key()  # connect
        keep = ("seed", "shards", "slices", "id_column", "label_column", "test_fraction", "eval_path", "options")
        return ray_ingest(source, storage, **{k: v for k, v in kwargs.items() if k in keep})

    def drop_caches(self) -> None:
        """Nothing to do: every worker in the pool finished its last run (`_sync`), or was discarded, so
        none holds a cached row or a model state between runs."""

    def shutdown(self) -> None:
        """Workers stay warm in the process-wide pool; `orchestration.pool.shutdown_all()` ends them."""


def _sync(actors: list, storage: Storage, written: dict) -> list:
    """Every checkpoint of this run durable before the caller commits, and no cached row or model state
    left in any worker. ``written`` holds the workers that did not finish in their last call (`submit`'s
    ``finish``): each live one finishes now. The files of a worker that died, or cannot finish, are synced
    from here (on one machine that is its disk's page cache; on a shared mount, what the dead worker's
    node had flushed). Returns the live workers that could not finish, to be discarded."""
    refs = {a: a.finish.remote() for a in actors if a in written}
    failed = []
    for actor, ref in refs.items():
        try:
            ray.get(ref)
        except RayError:
            failed.append(actor)
    storage.sync([f for a, files in written.items() if a not in refs or a in failed for f in files])
    return failed


def _short(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[-1] if s else ""
