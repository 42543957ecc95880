"""The executor interface: run a set of shard plans (each from some stage to the last) to completion."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shards.spec import TrainSpec
from shards.storage import Storage


@dataclass
class ShardPlan:
    """Train ``shard`` from ``start_stage`` (1-based) to the last stage.

    ``prev`` is the manifest entry of the checkpoint after ``start_stage - 1`` (None: fresh init).
    ``epochs`` is the shard's own schedule, one entry per slice, when it has stages appended after the
    config's (``sharding.new_rows: append``); None: the spec's schedule.
    """

    shard: int
    start_stage: int
    slices: list[dict]
    prev: dict | None = None
    epochs: tuple[int, ...] | None = None
    # filled while running
    checkpoints: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    attempts: int = 0

    @property
    def next_stage(self) -> int:
        return self.start_stage + len(self.checkpoints)

    @property
    def last(self) -> dict | None:
        return self.checkpoints[-1] if self.checkpoints else self.prev

    def stages(self, spec: TrainSpec) -> int:
        """The shard's last stage: one per slice of its own schedule."""
        return spec.slices if self.epochs is None else len(self.epochs)

    def spec(self, spec: TrainSpec) -> TrainSpec:
        """The spec of this shard's next stage (`TrainSpec.for_stage`)."""
        return spec.for_stage(self.epochs, self.next_stage)

    def record(self, entry: dict, metrics: dict) -> None:
        self.checkpoints.append(entry)
        self.metrics.append(metrics)


StageCallback = Callable[[ShardPlan, dict, dict], None]


class Executor:
    """Runs plans; ``on_stage(plan, entry, metrics)`` is called on the driver after every stage, and
    ``meanwhile()`` once, while the first stages train where the shards train elsewhere (the caller's work
    that need not wait for the weights), else before they start."""

    name = "base"

    def run(
        self,
        storage: Storage,
        spec: TrainSpec,
        plans: list[ShardPlan],
        on_stage: StageCallback | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[ShardPlan]:
        raise NotImplementedError

    def ingest(self, source: str, storage: Storage, **kwargs):
        """Partition the Parquet dataset ``source`` into ``storage`` (`shards.ingest.ingest_parquet`: one
        process, a local spill); returns its `shards.ingest.Ingested`."""
        from shards.ingest import ingest_parquet

        return ingest_parquet(source, storage, **kwargs)

    def drop_caches(self) -> None:
        """Forget cached shard data (called after a deletion)."""

    def shutdown(self) -> None:
        pass
