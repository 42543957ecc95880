"""Run by tests/unit/shards/test_rowcache.py in a fresh process: a shard more than twice the data memory it
is allowed (RLIMIT_DATA) trains from the worker's memory-mapped row cache; copying it in memory cannot."""

import resource
import sys

import numpy as np

from shards import training
from shards.rowcache import RowCache, Rows
from shards.spec import TrainSpec
from shards.storage import Storage
from shards.store import write_partition

ROWS, FEATURES, SLICES, HEADROOM = 20480, 4096, 16, 128 << 20  # a 320 MiB shard, 128 MiB allowed


def vm_data() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData")


def main(root: str) -> None:
    rng = np.random.default_rng(0)
    store = Storage(f"{root}/store")
    X = rng.standard_normal((ROWS, FEATURES), dtype=np.float32)
    entries = write_partition(store, np.arange(ROWS), X, rng.integers(0, 3, ROWS), "int", 0, 1, SLICES)[0]
    del X
    spec = TrainSpec(seed=0, model="mlp", model_kwargs={"hidden": [4]}, optim={"lr": 0.01},
                     epochs_per_stage=(0,) * (SLICES - 1) + (1,), batch_size=256,
                     input_shape=(FEATURES,), num_classes=3)  # fmt: skip
    training.run_stage(spec, 0, SLICES, None, Rows(np.zeros((8, FEATURES), np.float32), np.zeros(8, np.int64)), "w")
    resource.setrlimit(resource.RLIMIT_DATA, (vm_data() + HEADROOM, resource.RLIM_INFINITY))
    rows = RowCache(f"{root}/cache").rows(store, 0, entries)
    assert rows["x"].nbytes > 2 * HEADROOM
    training.run_stage(spec, 0, SLICES, None, rows, "lineage")
    print("memmap: trained")
    try:
        training.run_stage(spec, 0, SLICES, None, Rows(rows["x"].view(np.ndarray), rows["y"]), "lineage")
    except MemoryError:
        print("copy: MemoryError")


if __name__ == "__main__":
    main(sys.argv[1])
