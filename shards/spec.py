"""What one shard's training needs to know, as plain picklable data (no config classes from `sisa`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

# training.precision (Lightning's names): fp32 throughout, or fp32 master weights with bf16 arithmetic
FP32 = "32-true"
BF16_MIXED = "bf16-mixed"


@dataclass(frozen=True)
class TrainSpec:
    seed: int
    model: str
    model_kwargs: dict
    optim: dict  # optimizer, lr, weight_decay, momentum, lr_gamma (built-ins only)
    epochs_per_stage: tuple[int, ...]
    batch_size: int
    input_shape: tuple[int, ...]
    num_classes: int
    threads: int = 1
    accelerator: str = "cpu"
    extra: dict = field(default_factory=dict)

    @property
    def slices(self) -> int:
        return len(self.epochs_per_stage)

    def for_stage(self, schedule: tuple[int, ...] | None, stage: int) -> TrainSpec:
        """The spec stage ``stage`` of a shard with its own ``schedule`` trains with (None: this spec's).

        A shard with appended stages (``sharding.new_rows: append``) has a longer schedule than the
        config's. Its canonical stages keep the config's schedule, so they train exactly as `fit` trains
        them; appended stage k sees the schedule up to k (`SisaContext.total_epochs` grows with it), so a
        stage never depends on stages appended after it and a replay of the history gives the same bits."""
        if schedule is None:
            return self
        return replace(self, epochs_per_stage=tuple(schedule[: max(self.slices, stage)]))


def derive_seed(*parts) -> int:
    """A 63-bit seed that depends on every part: used per (seed, shard, stage, epoch)."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class SisaContext:
    """What a user's LightningModule may read in ``configure_optimizers`` (as ``self.sisa_context``): where
    this stage sits in the shard's whole schedule.

    A stage trains on slices 1..stage and resumes the optimizer and scheduler state of the stage before, so
    a scheduler's horizon must cover the whole run, not one stage. That horizon is given in epochs
    (`total_epochs`): a horizon in steps would depend on the sizes of later slices, which a deletion
    changes, and then the earlier stages' checkpoints would no longer be reusable (exactness).
    """

    shard: int
    stage: int  # 1-based
    epochs_per_stage: tuple[int, ...]
    rows: int  # rows this stage trains on (slices 1..stage)
    batch_size: int
    optim: dict = field(default_factory=dict)  # training.optimizer, lr, weight_decay, momentum, lr_gamma

    @property
    def stages(self) -> int:
        return len(self.epochs_per_stage)

    @property
    def stage_epochs(self) -> int:
        return self.epochs_per_stage[self.stage - 1]

    @property
    def epoch_offset(self) -> int:
        """Epochs trained by the stages before this one: the global index of this stage's first epoch."""
        return sum(self.epochs_per_stage[: self.stage - 1])

    @property
    def total_epochs(self) -> int:
        """Epochs over all stages: the whole-run horizon (e.g. OneCycleLR(total_steps=...) stepped per epoch)."""
        return sum(self.epochs_per_stage)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps (batches) per epoch in this stage; it grows from stage to stage."""
        return -(-self.rows // self.batch_size)
