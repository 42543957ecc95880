"""What one shard's training needs to know, as plain picklable data (no config classes from `sisa`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


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


def derive_seed(*parts) -> int:
    """A 63-bit seed that depends on every part: used per (seed, shard, stage, epoch)."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
